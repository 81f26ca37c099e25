"""Mixed precision: `--format-for SELECTOR=FORMAT` and `[[format]]` rules give quantizers their own
formats. Fused sets and the experts of one MoE layer share a format; the compressed-tensors flavor
writes one config group per format whose `re:` targets pick exactly its modules, and verify resolves
each module's format the way the engines do (docs/formats.md 1.2)."""

from __future__ import annotations

import json
import re

import pytest
from click.testing import CliRunner

from shardquant import formats, testing
from shardquant.cli import main
from shardquant.convert import convert, prepare
from shardquant.errors import PlanError, RuleError
from shardquant.rules import KINDS, format_choice
from shardquant.verify import announced, verify, verify_contract

MANIFEST = "scale_manifest.json"
CT = "compressed-tensors"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A Qwen3-MoE checkpoint every format fits: 128-multiples for fp8-block tiles."""
    return testing.write_checkpoint(tmp_path_factory.mktemp("mixed") / "src", testing.TILED["qwen3_moe"](), seed=5)


def manifest(out):
    return json.loads((out / MANIFEST).read_text())


def qconfig(out):
    return json.loads((out / "config.json").read_text())["quantization_config"]


# ---------------------------------------------------------------------------------------------
# choosing formats

def test_kinds_name_only_quantize_rows():
    from shardquant.rules import BUILTIN_RULES, QUANTIZE

    rows = {r.name: r.action for r in BUILTIN_RULES}
    named = [n for names in KINDS.values() for n in names]
    assert len(named) == len(set(named))  # a row belongs to one kind
    assert all(rows[n] == QUANTIZE for n in named)
    assert {n for n, a in rows.items() if a == QUANTIZE} == set(named)  # and every quantize row to one


@pytest.mark.parametrize("spec,why", [
    ("attention", "expected SELECTOR=FORMAT"),
    ("=nvfp4", "expected SELECTOR=FORMAT"),
    ("attention=int4", "unknown format 'int4'"),
    ("(unclosed=nvfp4", "bad regex"),
])
def test_bad_choice(spec, why):
    with pytest.raises(RuleError, match=re.escape(why)):
        format_choice(spec, tuple(formats.FORMATS))


def test_choice_case_and_keep():
    c = format_choice("experts=FP8-Block", tuple(formats.FORMATS))
    assert (c.selector, c.format) == ("experts", "fp8-block")
    assert format_choice("mlp=keep", tuple(formats.FORMATS)).format == "keep"


def test_plan_per_group_formats(src):
    p = prepare(str(src), "nvfp4", format_for=("attention=fp8-channel",))
    by = {g.key: g.format for g in p.groups}
    assert {k for k, f in by.items() if f == "fp8-channel"} == {
        f"model.layers.{L}.self_attn.{s}" for L in (0, 1) for s in ("qkv_proj", "o_proj")}
    assert all(f == "nvfp4" for k, f in by.items() if ".experts." in k)
    # modelopt (nvfp4's own flavor) does not spell fp8-channel: the first flavor that spells both
    assert p.flavor == CT and p.formats == ["nvfp4", "fp8-channel"]
    assert "--flavor compressed-tensors: nvfp4's own flavor, modelopt, does not spell fp8-channel" in p.warnings
    # output tensors follow each group's format
    q = "model.layers.0.self_attn.q_proj"
    assert p.out_tensors[f"{q}.weight"].dtype == "F8_E4M3"
    assert p.out_tensors[f"{q}.weight_scale"].shape == (p.checkpoint.tensors[f"{q}.weight"].shape[0], 1)
    e = "model.layers.0.mlp.experts.0.up_proj"
    assert p.out_tensors[f"{e}.weight_packed"].dtype == "U8"


def test_first_choice_wins_and_unused_choice_warns(src):
    p = prepare(str(src), "nvfp4", format_for=("experts=mxfp4", r"model\.layers\.0\.mlp\.experts\..*=fp8-block"),
                flavor=CT)
    assert {g.format for g in p.groups if ".experts." in g.key} == {"mxfp4"}
    assert any("picks no quantized tensor" in w and "fp8-block" in w for w in p.warnings)


def test_rule_name_and_regex_selectors(src):
    p = prepare(str(src), "fp8-channel", format_for=("attn_other=fp8-block", r".*\.1\.mlp\.experts\..*=mxfp8"))
    by = {g.key: g.format for g in p.groups}
    assert by["model.layers.1.mlp.experts.*.down_proj"] == by["model.layers.1.mlp.experts.*.gate_up_proj"] == "mxfp8"
    assert by["model.layers.0.mlp.experts.*.gate_up_proj"] == "fp8-channel"
    assert by["model.layers.0.self_attn.o_proj"] == "fp8-block"
    assert by["model.layers.0.self_attn.qkv_proj"] == "fp8-channel"


def test_keep(src):
    p = prepare(str(src), "nvfp4", format_for=("attention=keep",))
    assert not any("self_attn" in g.key for g in p.groups)
    kept = {e["name"]: e["reason"] for e in p.excluded}
    assert kept["model.layers.0.self_attn.k_proj.weight"] == "--format-for attention=keep"
    assert "model.layers.0.self_attn.k_proj" in p.exclude_modules
    assert p.formats == ["nvfp4"] and p.flavor == "modelopt"


def test_fused_set_shares_one_format(src):
    with pytest.raises(RuleError, match=r"qkv_proj: the members of a fused set share one format, but "
                                        r".*q_proj\.weight takes fp8-block"):
        prepare(str(src), "nvfp4", format_for=(r".*q_proj=fp8-block",))


def test_moe_layer_shares_one_format(src):
    # per-expert quantizers, expert 1 of layer 0 asked to differ: engines run one scheme per MoE layer
    with pytest.raises(RuleError, match=r"MoE layer model\.layers\.0\.mlp: quantizer .* takes (nvfp4|mxfp4) but "
                                        r".* takes (mxfp4|nvfp4)"):
        prepare(str(src), "nvfp4", expert_policy="per-expert", flavor=CT,
                format_for=(r"model\.layers\.0\.mlp\.experts\.1\..*=mxfp4",))
    # down and gate/up of one layer's experts too
    with pytest.raises(RuleError, match="MoE layer"):
        prepare(str(src), "nvfp4", flavor=CT, format_for=("experts_down=mxfp4",))


def test_flavor_must_spell_every_format(src):
    with pytest.raises(PlanError, match=r"--format-for \.\.\.=fp8-block --flavor modelopt is refused: ModelOpt's "
                                        "FP8_PB_WO"):
        prepare(str(src), "nvfp4", flavor="modelopt", format_for=("attention=fp8-block",))
    r = cli("plan", src, "--format", "nvfp4", "--flavor", "block-fp8", "--format-for", "attention=fp8-block")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "--format nvfp4 --flavor block-fp8 is refused" in r.output


def test_rules_file_formats(src, tmp_path):
    f = tmp_path / "mixed.toml"
    f.write_text('[[format]]\nselect = "attention"\nformat = "fp8-block"\n\n'
                 '[[format]]\nselect = "experts"\nformat = "mxfp4"\n')
    p = prepare(str(src), "nvfp4", rules_file=f)
    assert {g.format for g in p.groups} == {"fp8-block", "mxfp4"} and p.flavor == CT
    # --format-for comes first
    p = prepare(str(src), "nvfp4", rules_file=f, format_for=("attention=fp8-channel",))
    assert {g.format for g in p.groups} == {"fp8-channel", "mxfp4"}
    f.write_text('[[format]]\nselect = "attention"\nformat = "int3"\n')
    with pytest.raises(RuleError, match=r"mixed\.toml: format 0 .*unknown format 'int3'"):
        prepare(str(src), "nvfp4", rules_file=f)
    f.write_text('[[format]]\nselect = "attention"\nformats = "fp8"\n')
    with pytest.raises(RuleError, match="needs exactly select and format"):
        prepare(str(src), "nvfp4", rules_file=f)


def test_plan_table_shows_formats(src):
    r = cli("plan", src, "--format", "nvfp4", "--format-for", "attention=fp8-channel", "--verbose")
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0] == "compressed-tensors flavor; formats nvfp4, fp8-channel"
    end = next(i for i, ln in enumerate(lines) if ln.startswith("total:"))
    rows = {ln.split()[0]: ln.split()[1] for ln in lines[2:end]}
    assert rows["model.layers.1.self_attn.o_proj"] == "fp8-channel"
    assert rows["model.layers.1.mlp.experts.*.down_proj"] == "nvfp4"


# ---------------------------------------------------------------------------------------------
# writing and verifying

RECIPES = {
    "nvfp4+fp8-channel": ("nvfp4", ("attention=fp8-channel",), "shared"),
    "mxfp4+fp8-block": ("mxfp4", ("attention=fp8-block",), "shared"),
    "fp8-channel+mxfp8/layer": ("fp8-channel", (r"model\.layers\.1\.mlp\.experts\..*=mxfp8",), "per-expert"),
}


@pytest.fixture(scope="module")
def mixed(src, tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed-out")
    out = {}
    for name, (fmt, picks, policy) in RECIPES.items():
        d = root / name.replace("/", "-")
        convert(str(src), d, fmt, format_for=picks, expert_policy=policy, device="cpu", verify=True)
        out[name] = d
    return out


@pytest.mark.parametrize("recipe", RECIPES)
def test_config_groups_pick_exactly_their_modules(mixed, recipe):
    out = mixed[recipe]
    man, qc = manifest(out), qconfig(out)
    used = {q["format"] for q in man["quantizers"].values()}
    assert len(used) == 2
    assert qc["format"] == "mixed-precision" and len(qc["config_groups"]) == 2
    spelled = {}
    for g in qc["config_groups"].values():
        assert all(t.startswith("re:^") and t.endswith("$") for t in g["targets"])
        spelled[g["format"], g["weights"]["strategy"]] = g
    for f in used:
        s = formats.declared(f).compressed_tensors
        g = spelled[s["format"], s["weights"]["strategy"]]
        assert g["weights"] == s["weights"] and g["input_activations"] == s["input_activations"]
    # every quantized module resolves (exact/regex before class name, as the engines do) to its
    # quantizer's format; kept modules are in `ignore`
    ann = announced(out, [], [], frozenset(used))
    assert set(ann.formats) == used
    for src_name, t in man["tensors"].items():
        module = src_name.removesuffix(".weight")
        assert ann.format_of(module) == man["quantizers"][t["quantizer"]]["format"], module
    for module in qc["ignore"]:
        assert module not in {n.removesuffix(".weight") for n in man["tensors"]}
    # patterns are widened over experts: fewer patterns than modules
    assert sum(len(g["targets"]) for g in qc["config_groups"].values()) < len(man["tensors"]) / 4


def test_layer_index_kept_where_layers_differ(mixed):
    qc = qconfig(mixed["fp8-channel+mxfp8/layer"])
    targets = {t for g in qc["config_groups"].values() for t in g["targets"]}
    assert r"re:^model\.layers\.1\.mlp\.experts\.\d+\.gate_proj$" in targets
    assert r"re:^model\.layers\.0\.mlp\.experts\.\d+\.gate_proj$" in targets
    assert r"re:^model\.layers\.\d+\.self_attn\.q_proj$" in targets


@pytest.mark.parametrize("recipe", RECIPES)
def test_verify_source_per_format_floor(mixed, src, recipe):
    rep = verify(mixed[recipe], str(src))
    assert rep.ok, rep.violations
    man = manifest(mixed[recipe])
    fmt_of = {n: man["quantizers"][t["quantizer"]]["format"] for n, t in man["tensors"].items()}
    assert {t.name for t in rep.tensors} == set(fmt_of)
    for t in rep.tensors:  # each tensor at least at its own format's floor
        assert t.sqnr_db >= formats.declared(fmt_of[t.name]).min_sqnr, t.name
    # fp8-family tensors are far better than the 4-bit ones: the per-module format was used
    best = {f: min(t.sqnr_db for t in rep.tensors if fmt_of[t.name] == f) for f in set(fmt_of.values())}
    eight = [f for f in best if formats.declared(f).num_bits == 8]
    four = [f for f in best if formats.declared(f).num_bits == 4]
    if eight and four:
        assert min(best[f] for f in eight) > max(best[f] for f in four) + 5


def _rewrite_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg["quantization_config"])
    (d / "config.json").write_text(json.dumps(cfg))


def test_verify_module_no_group_targets(mixed, tmp_path):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(mixed["nvfp4+fp8-channel"], d)

    def drop_o_proj(qc):
        for g in qc["config_groups"].values():
            g["targets"] = [t for t in g["targets"] if "o_proj" not in t]
    _rewrite_config(d, drop_o_proj)
    vs = verify_contract(d, hashes=False)
    untargeted = [v for v in vs if v.rule == "config" and "no config group targets it" in v.detail]
    assert sorted(v.name for v in untargeted) == [f"model.layers.{L}.self_attn.o_proj" for L in (0, 1)]


def test_verify_group_gives_module_the_wrong_format(mixed, tmp_path):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(mixed["nvfp4+fp8-channel"], d)

    def swap_targets(qc):  # attention modules now announced as nvfp4: tensors and manifest disagree
        a, b = qc["config_groups"].values()
        a["targets"], b["targets"] = b["targets"], a["targets"]
    _rewrite_config(d, swap_targets)
    vs = verify_contract(d, hashes=False)
    rules = {v.rule for v in vs}
    assert "tensors" in rules and "manifest" in rules
    assert any(v.rule == "manifest" and "the config gives the module" in v.detail for v in vs)


def test_single_format_output_unchanged_by_mixed_machinery(src, tmp_path):
    """One format: one config group targeting Linear, no per-quantizer surprises."""
    out = tmp_path / "one"
    convert(str(src), out, "fp8-channel", device="cpu")
    qc = qconfig(out)
    assert list(qc["config_groups"]) == ["group_0"] and qc["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert qc["format"] == "float-quantized"
    assert {q["format"] for q in manifest(out)["quantizers"].values()} == {"fp8-channel"}
    assert manifest(out)["format"] == "fp8-channel"


def test_fp8_and_fp8_channel_spelled_alike_are_told_apart_by_the_manifest(src, tmp_path):
    """Both are compressed-tensors `channel` weights; the manifest names which one was written, and
    without a manifest (another producer's per-channel FP8) verify reads the general one."""
    for fmt in ("fp8", "fp8-channel"):
        out = tmp_path / fmt
        convert(str(src), out, fmt, device="cpu")
        assert verify_contract(out) == []
        (out / MANIFEST).unlink()
        ann = announced(out, [], [])
        assert ann.format == "fp8-channel"
