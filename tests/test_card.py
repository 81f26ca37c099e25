"""The output's README.md is a model card (shardquant/card.py): hub front matter, the recipe, what was
kept, the schemes, the engines that serve it with their commands, how to verify, and the source's card
below a separator; deterministic, listed in the manifest with its SHA-256, and `verify` passes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from shardquant import card, manifest, testing
from shardquant.cli import main
from shardquant.convert import convert, finish_names, prepare
from shardquant.verify import verify

SOURCE_CARD = """---
license: apache-2.0
pipeline_tag: text-generation
language:
- en
- fr
base_model: someone/else
tags: [chat, moe]
---

# Tiny MoE

A small model. It says `hello`.
"""
SOURCE_BODY = "# Tiny MoE\n\nA small model. It says `hello`.\n"


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return testing.write_checkpoint(tmp_path_factory.mktemp("src") / "tiny-moe", testing.qwen3_moe(),
                                    extra_files={"README.md": SOURCE_CARD})


@pytest.fixture(scope="module")
def bare_src(tmp_path_factory):
    return testing.write_checkpoint(tmp_path_factory.mktemp("bare") / "tiny-dense", testing.llama())


@pytest.fixture(scope="module")
def out(src, tmp_path_factory):
    o = tmp_path_factory.mktemp("out") / "o"
    convert(str(src), o, "nvfp4", device="cpu")
    return o


def front(text: str) -> tuple[dict, str]:
    """The card's front matter, read by a real YAML parser, and the rest."""
    assert text.startswith("---\n")
    head, rest = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), rest


# ---------------------------------------------------------------------------------------------
# the source card's front matter

def test_front_matter_parsed_minimally():
    meta, body = card.split_front_matter(SOURCE_CARD)
    assert meta == {"license": "apache-2.0", "language": ["en", "fr"], "pipeline_tag": "text-generation"}
    assert body == SOURCE_BODY
    text = ("\ufeff---\nlicense: 'other'  \nlicense_name: \"my license\" # the name\nlicense_link: LICENSE.md  # c\n"
            "extra:\n  nested: 1\nlanguage: [en, 'de']\nwidget:\n  - text: hi\n...\nbody\n")
    meta, body = card.split_front_matter(text)
    assert meta == {"license": "other", "license_name": "my license", "license_link": "LICENSE.md",
                    "language": ["en", "de"]}
    assert body == "body\n"
    for plain in ("# no front matter\n", "---\nlicense: mit\nnever closed\n", ""):
        assert card.split_front_matter(plain) == ({}, plain)


def test_front_matter_written_is_valid_yaml():
    meta = {"license": "other", "license_name": "a: b # c", "language": ["en", "yes", "1.0"], "tags": ["x"]}
    assert yaml.safe_load(card.front_matter(meta).strip("-\n")) == meta


def test_markdown_escaping():
    assert card._code("a`b|c") == "`` a`b\\|c ``"
    assert "\n" not in card._text("line\nbreak <b>") and "\\<b\\>" in card._text("<b>")


# ---------------------------------------------------------------------------------------------
# the card of a converted checkpoint

def test_card_replaces_the_source_readme(src, out):
    text = (out / "README.md").read_text()
    meta, body = front(text)
    assert meta["license"] == "apache-2.0" and meta["pipeline_tag"] == "text-generation"
    assert meta["language"] == ["en", "fr"]
    assert "base_model" not in meta and "base_model_relation" not in meta  # a local source has no hub id
    assert meta["library_name"] == "Model Optimizer"
    assert {"modelopt", "nvfp4", "quantized", "shardquant"} <= set(meta["tags"])
    assert "# tiny-moe (NVFP4, modelopt)" in body
    assert "the local checkpoint `tiny-moe`" in body
    assert str(src.parent) not in text  # the user's path is not published
    assert "| `nvfp4` | 8 | 56 | attention (4), routed experts (4) |" in body
    assert "Expert policy `shared`" in body
    assert "- norm: 9" in body and "- router: 2 (`model.layers.0.mlp.gate.weight`, " in body
    assert "- output head: 1 (`lm_head.weight`)" in body
    assert "W4A16" in body and "`weight_scale_2`" in body
    # served by vLLM, SGLang and TensorRT-LLM; transformers has no ModelOpt quantizer
    assert "vllm serve <model>" in body and 'LLM(model="<model>")' in body
    assert "python -m sglang.launch_server --model-path <model>" in body
    assert "trtllm-serve <model>" in body
    assert "AutoModelForCausalLM" not in body and "`transformers:no-modelopt`" in body
    assert "shardquant verify <model>" in body
    # the source card below the separator, once, without its front matter
    assert body.count("\n---\n\n## Original model card\n\n") == 1
    assert body.endswith("## Original model card\n\n" + SOURCE_BODY)
    assert text.count("A small model") == 1 and "someone/else" not in text and "chat" not in meta["tags"]


def test_card_is_in_the_manifest_and_verify_passes(out):
    man = json.loads((out / manifest.MANIFEST_NAME).read_text())
    data = (out / "README.md").read_bytes()
    assert man["files"]["README.md"] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    rep = verify(out)
    assert rep.ok, rep.violations
    r = cli("verify", out, "-q")
    assert r.exit_code == 0, r.output


def test_card_is_deterministic(src, out, tmp_path):
    """Another output directory, and --verify: the same bytes (verify results are not in the card)."""
    o = tmp_path / "elsewhere"
    r = cli("convert", src, "-o", o, "--format", "nvfp4", "--device", "cpu", "--verify", "-q")
    assert r.exit_code == 0, r.output
    assert (o / "README.md").read_bytes() == (out / "README.md").read_bytes()
    assert (o / manifest.MANIFEST_NAME).read_bytes() == (out / manifest.MANIFEST_NAME).read_bytes()


def test_card_without_a_source_readme(bare_src, tmp_path):
    o = tmp_path / "o"
    convert(str(bare_src), o, "fp8-channel", device="cpu")
    text = (o / "README.md").read_text()
    meta, body = front(text)
    assert "license" not in meta and "pipeline_tag" not in meta
    assert meta["library_name"] == "transformers" and "compressed-tensors" in meta["tags"]
    assert "Original model card" not in text
    assert "| `fp8-channel` | 8 | 14 | attention (4), dense MLP (4) |" in body
    assert "one fp32 scale per output row" in body and "one scale per token" in body
    assert "no effect on `fp8-channel`" in body
    assert "AutoModelForCausalLM.from_pretrained" in body and "compressed-tensors" in body
    man = json.loads((o / manifest.MANIFEST_NAME).read_text())
    assert man["files"]["README.md"]["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert verify(o).ok


def test_mx_compressed_tensors_card_has_no_sglang(src, tmp_path):
    o = tmp_path / "o"
    convert(str(src), o, "mxfp4", device="cpu")
    _, body = front((o / "README.md").read_text())
    assert "sglang.launch_server" not in body and "`sglang:ct-no-mx`" in body
    assert "vllm serve <model>" in body and "AutoModelForCausalLM" in body
    assert "one E8M0 (uint8) scale per 32 weights along the input" in body


def test_mixed_precision_card_lists_both_formats(src, tmp_path):
    o = tmp_path / "o"
    convert(str(src), o, "nvfp4", device="cpu", format_for=("attention=fp8",))
    meta, body = front((o / "README.md").read_text())
    assert {"nvfp4", "fp8", "fp4", "compressed-tensors"} <= set(meta["tags"])
    assert "# tiny-moe (NVFP4 + FP8, compressed-tensors)" in body
    assert "Mixed-precision NVFP4 + FP8 weights" in body
    assert "| `nvfp4` | 4 | 48 | routed experts (4) |" in body
    assert "| `fp8` | 4 | 8 | attention (4) |" in body
    assert body.count("| `nvfp4` | E2M1") == 1 and body.count("| `fp8` | E4M3") == 1
    assert verify(o).ok


def test_hub_source_names_base_model(src):
    """A hub source: base_model and its revision (the plan's checkpoint as open_checkpoint fills it)."""
    plan = prepare(str(src), "fp8")
    plan.checkpoint.repo, plan.checkpoint.revision = "org/Tiny-MoE", "0123456789abcdef"
    doc = manifest.build(plan, {g.key: (1.0, 1.0) for g in plan.groups}, "numpy", {}, {})
    text = card.model_card(plan, doc, None, SOURCE_CARD)
    meta, body = front(text)
    assert meta["base_model"] == ["org/Tiny-MoE"] and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0"
    assert "# Tiny-MoE (FP8, compressed-tensors)" in body
    assert "[org/Tiny-MoE](https://huggingface.co/org/Tiny-MoE) at revision `0123456789abcdef`" in body
    assert "--source org/Tiny-MoE --revision 0123456789abcdef" in body
    assert "Run `shardquant verify <model>` to see which engines serve" in body  # no verdicts given
    assert text == card.model_card(plan, doc, None, SOURCE_CARD)


def test_verify_report_in_card(out):
    """The API renders a verify report when one is given (convert never passes one)."""
    rep = verify(out)
    doc = json.loads((out / manifest.MANIFEST_NAME).read_text())

    class _Plan:  # what model_card reads of a plan: the checkpoint's root and config
        class checkpoint:
            root = Path("tiny-moe")
            config = {}

    text = card.model_card(_Plan, doc, rep, None)
    assert "`shardquant verify` on this output passed: 56 quantized modules" in text
    assert "vllm serve <model>" in text and "AutoModelForCausalLM" not in text  # the report's engine verdicts


def test_finish_names_lists_the_card_once(src, bare_src):
    for s in (src, bare_src):
        names = finish_names(prepare(str(s), "nvfp4"))
        assert names.count("README.md") == 1
        assert names[-2:] == [manifest.MANIFEST_NAME, "model.safetensors.index.json"]


def test_source_card_of_front_matter_only_and_long_card(src):
    plan = prepare(str(src), "nvfp4")
    doc = manifest.build(plan, {g.key: (1.0, 1.0) for g in plan.groups}, "numpy", {}, {})
    text = card.model_card(plan, doc, None, "---\nlicense: mit\n---\n")
    assert front(text)[0]["license"] == "mit" and "Original model card" not in text
    long = "x" * (card.MAX_SOURCE_README + 10)
    text = card.model_card(plan, doc, None, long)
    assert text.count("x" * 1000) and "*(cut: the original is longer)*" in text
    assert len(text.encode()) < card.MAX_SOURCE_README + 20_000


def test_manifest_with_files_equals_building_it_with_them(src):
    """shardquant/convert.py _finish builds the manifest once, for the card without its files table,
    then adds the table (manifest.with_files): the same document as building it with the table."""
    plan = prepare(str(src), "nvfp4")
    scales = {g.key: (1.5, 0.25) for g in plan.groups}
    sources = {"model.safetensors": {"sha256": "0" * 64, "size": 3, "checked_against_hub": False}}
    files = {"config.json": {"sha256": "1" * 64, "size": 2}, "README.md": {"sha256": "2" * 64, "size": 1}}
    bare = manifest.build(plan, scales, "numpy", {}, sources, recipe="r")
    full = manifest.build(plan, scales, "numpy", files, sources, recipe="r")
    assert bare["files"] == {} and full["files"] != {}
    assert manifest.with_files(bare, files) == full
    assert manifest.dumps(manifest.with_files(bare, files)) == manifest.dumps(full)


def test_card_judged_from_the_files_when_the_planned_judging_failed(src, tmp_path, monkeypatch):
    """The card's verdicts judged during the run (shardquant/convert.py _judge_planned) failing for
    any reason: the finished files are judged instead, and the card is the same."""
    import shardquant.convert as conv

    good = tmp_path / "good"
    convert(str(src), good, "nvfp4", device="cpu")

    def broken(plan, root):
        raise RuntimeError("planned judging broke")

    monkeypatch.setattr(conv, "_judge_planned", broken)
    other = tmp_path / "other"
    convert(str(src), other, "nvfp4", device="cpu")
    assert (other / card.CARD_NAME).read_bytes() == (good / card.CARD_NAME).read_bytes()
