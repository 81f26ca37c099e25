"""The output's README.md: a Hugging Face model card for the quantized checkpoint, not the source's.

YAML front matter (hub metadata: `base_model` and `base_model_relation: quantized`, `library_name`,
`tags`, and the source card's `license` / `pipeline_tag` / `language` carried over), then what was
converted from where, the recipe per format, what stayed in high precision and why, how engines
quantize activations and where the weight scales are, which engines serve it (with the command to
serve it in each), how to check it, and below a separator the source's own card without its front
matter.

Deterministic: a function of the plan, the scale manifest (shardquant/manifest.py, without its files
table) and the finished files' config and headers; no timestamps, no absolute paths (a local source
is named by its directory name only), no host names. shardquant/convert.py `_finish` writes it
through `OutputDir.write_file` before the manifest, which lists it with its SHA-256 like every file.
Its Verify section says how to run verify; `with_verify` gives the same card with a verify run's
results in that section (what `shardquant batch --push-to` uploads, shardquant/publish.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

from . import formats
from .errors import ShardquantError
from .flavors import FLAVORS
from .rules import KINDS
from .text import show

CARD_NAME = "README.md"
MAX_SOURCE_README = 1 << 20  # bytes of the source card kept below the separator; a longer one is cut
# Source front-matter keys carried into the card (hub model-card metadata about the weights' terms and
# task, which quantization does not change). license_name / license_link go with `license: other`.
CARRIED = ("license", "license_name", "license_link", "language", "pipeline_tag")
NAMES_SHOWN = 4  # kept tensors of one reason listed by name when there are at most this many
MODEL = "<model>"  # placeholder in the serve commands: this directory, or the hub repo it is uploaded to
# Engine checks that read tensor data beyond a few scalars (every MX scale byte): left to
# `shardquant verify`; the card's engine verdicts come from the config and headers (and fused scalars).
DATA_CHECKS = frozenset({"scale_bytes"})
_KIND_LABEL = {"attention": "attention", "experts": "routed experts", "shared-experts": "shared experts",
               "mlp": "dense MLP"}
_RULE_KIND = {rule: kind for kind, rules in KINDS.items() for rule in rules}
_DTYPE = {"F8_E4M3": "E4M3", "U8": "E8M0 (uint8)", "F32": "fp32", "F8_E8M0": "E8M0"}
_PLAIN_YAML = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/+-]*")
_YAML_WORDS = frozenset({"true", "false", "yes", "no", "on", "off", "null", "y", "n"})


# ---------------------------------------------------------------------------------------------
# the source card's front matter

def split_front_matter(text: str) -> tuple[dict[str, object], str]:
    """(carried metadata, body) of a model card. The front matter is the block between a first line
    `---` and the next line `---` (or `...`). Parsed minimally, on purpose: only top-level
    `key: value` lines and `key:` followed by `- item` lines, plus one-line `[a, b]` lists; anything
    nested is skipped. PyYAML is installed with huggingface-hub, but a real YAML parser would make the
    card's bytes depend on its version and accept tags, anchors and documents we do not need; the keys
    carried (CARRIED) are plain strings or lists of them on the hub. Only CARRIED keys are returned."""
    text = text.removeprefix("\ufeff")
    lines = text.split("\n")
    if not lines or lines[0].rstrip() != "---":
        return {}, text
    end = next((i for i in range(1, len(lines)) if lines[i].rstrip() in ("---", "...")), None)
    if end is None:  # no closing line: not front matter
        return {}, text
    meta: dict[str, object] = {}
    key: str | None = None
    for line in lines[1:end]:
        item = re.fullmatch(r"\s*-\s+(.*)", line)
        if item and key is not None and isinstance(meta.get(key), list):
            v = _scalar(item[1])
            if v is not None:
                meta[key].append(v)
            continue
        m = re.fullmatch(r"([A-Za-z_][\w-]*)\s*:(?:\s+(.*))?\s*", line)
        if m is None:
            if line[:1] not in (" ", "\t"):
                key = None  # something else at top level ends a list
            continue
        key, raw = m[1], (m[2] or "").strip()
        if not raw or raw.startswith("#"):
            meta[key] = []  # a block list may follow
        elif raw.startswith("[") and raw.endswith("]"):
            meta[key] = [v for v in (_scalar(p) for p in raw[1:-1].split(",")) if v is not None]
        else:
            v = _scalar(raw)
            if v is not None:
                meta[key] = v
    body = "\n".join(lines[end + 1:]).lstrip("\n")
    out = {k: meta[k] for k in CARRIED if meta.get(k) not in (None, [], "")}
    return out, body


def _scalar(raw: str) -> str | None:
    """A one-line YAML scalar as a string: quoted ('..', "..") or plain (a trailing ` #` comment
    dropped); None for what this parser does not read (maps, anchors, block scalars)."""
    raw = raw.strip()
    if not raw:
        return None
    if raw[0] == '"':
        try:
            v = json.loads(raw[:raw.rindex('"') + 1])
        except ValueError:
            return None
        return v if isinstance(v, str) else None
    if raw[0] == "'":
        end = raw.rfind("'")
        return raw[1:end].replace("''", "'") if end > 0 else None
    raw = re.split(r"\s+#", raw, maxsplit=1)[0].strip()
    if not raw or raw[0] in "{[&*!|>%@`":
        return None
    return raw


def _yaml(v: str) -> str:
    """A YAML scalar: plain when it cannot be read as anything but this string, else double-quoted
    (a JSON string is a valid YAML double-quoted scalar)."""
    if _PLAIN_YAML.fullmatch(v) and v.lower() not in _YAML_WORDS and not re.fullmatch(r"[-+.\d_eE]+", v):
        return v
    return json.dumps(v)


def front_matter(meta: dict[str, object]) -> str:
    out = ["---"]
    for k, v in meta.items():
        if isinstance(v, list):
            out.append(f"{k}:")
            out += [f"- {_yaml(x)}" for x in v]
        else:
            out.append(f"{k}: {_yaml(str(v))}")
    return "\n".join(out + ["---", ""])


# ---------------------------------------------------------------------------------------------
# which engines serve it

def engine_verdicts(root: Path, tensors: dict) -> list:
    """Every engine's verdict (shardquant/engines.py Verdict) on the checkpoint at `root`, as
    `shardquant verify` computes them (the engine_rules tables against config.json, hf_quant_config.json
    and the tensor headers), less the checks that read every scale byte (DATA_CHECKS). `tensors`: the
    finished shards' headers (the index is written after the card)."""
    from . import engines

    return Judging(engines.Checkpoint.read(Path(root), _ordered(tensors))).verdicts()


def _ordered(tensors: dict) -> dict:
    return {t.name: t for t in sorted(tensors.values(), key=lambda t: (t.file.name, t.offset))}


class Judging:
    """engine_verdicts in two steps. Made (on a thread, while the shards are written: shardquant/convert.py)
    from the configs and the headers the output will have: every rule that reads only those is judged
    here. verdicts(), once the shards are finished: the rules that read values from them (fused sets'
    scalars), then each engine's verdict, its findings in its table's order. A checkpoint of ~20k
    tensors takes most of a second to judge; this way little of it is left for the end of a conversion."""

    def __init__(self, ck) -> None:
        from . import engines

        self.parts = []
        for e in engines.tables().values():
            lite = dataclasses.replace(e, rules=tuple(r for r in e.rules if r.check not in DATA_CHECKS))
            view = engines.View(lite, ck)
            self.parts.append((e, view, [None if engines.CHECKS[r.check].values else engines.judge(view, r)
                                         for r in lite.rules]))

    @classmethod
    def planned(cls, root: Path, configs: dict, tensors: dict) -> Judging:
        """From the output's planned files: `configs` {file name: its JSON document}, `tensors` the headers."""
        from . import engines

        return cls(engines.Checkpoint.of(Path(root), configs.get("config.json"), configs.get("hf_quant_config.json"),
                                         _ordered(tensors)))

    def verdicts(self) -> list:
        from . import engines

        out = []
        for e, view, found in self.parts:
            got = [f for r, fs in zip(view.engine.rules, found) for f in (engines.judge(view, r) if fs is None else fs)]
            out.append(engines.Verdict(e, view.flavor, got, False))
        return out


def _serve_lines(engine: str, flavor: str) -> list[str]:
    """How to serve a checkpoint in one engine (engine names of shardquant/engine_rules/*.json)."""
    if engine == "vllm":
        return ["```bash", f"vllm serve {MODEL}", "```", "", "```python", "from vllm import LLM", "",
                f'llm = LLM(model="{MODEL}")', 'print(llm.generate("Hello")[0].outputs[0].text)', "```"]
    if engine == "sglang":
        return ["```bash", f"python -m sglang.launch_server --model-path {MODEL}", "```"]
    if engine == "trtllm":
        return ["```bash", f"trtllm-serve {MODEL}", "```"]
    if engine == "transformers":
        need = " (needs `pip install compressed-tensors`)" if flavor == "compressed-tensors" else ""
        return ([f"Loads with its quantized weights{need}:", ""] if need else []) + [
            "```python", "from transformers import AutoModelForCausalLM", "",
            f'model = AutoModelForCausalLM.from_pretrained("{MODEL}", dtype="auto")', "```"]
    return []


# ---------------------------------------------------------------------------------------------
# what a verify run found, as the card states it

@dataclasses.dataclass(frozen=True)
class VerifyFacts:
    """A verify Report (shardquant/report.py) reduced to what the card states: plain values, so a batch
    worker sends its fields back with its job's result (shardquant/batch.py JobResult.verify_facts)."""

    ok: bool
    modules: int  # quantized modules checked
    files: int | None = None  # files checked against the manifest (None: no files table)
    hashed: bool = False  # ... by SHA-256 (else sizes only)
    violations: int = 0
    rules: tuple[str, ...] = ()  # the rules violated, sorted
    tensors: int = 0  # quantized tensors compared with the source (0: not compared)
    overall_sqnr_db: float | None = None  # all compared tensors' signal over all their noise
    worst_sqnr_db: float | None = None
    worst_tensor: str | None = None
    min_sqnr_db: float | None = None  # the floor a tensor had to reach
    engines: tuple[tuple[str, str], ...] = ()  # (engine label, verdict), as verify gave them

    @classmethod
    def of(cls, rep) -> "VerifyFacts":
        worst = rep.worst(1)[0] if rep.tensors else None
        eng = getattr(rep, "engines", None)
        return cls(rep.ok, rep.modules, rep.files_checked, rep.hashed, len(rep.violations),
                   tuple(sorted({v.rule for v in rep.violations})), len(rep.tensors),
                   rep.overall().sqnr_db if rep.tensors else None, worst.sqnr_db if worst else None,
                   worst.name if worst else None, rep.min_sqnr if rep.tensors else None,
                   tuple((v.engine.label, v.status) for v in eng.verdicts) if eng is not None else ())


def with_verify(text: str, facts: VerifyFacts, repo: str | None, revision: str | None) -> str:
    """The card `text` (as model_card wrote it without a verify run, for the source `repo` at
    `revision` of its manifest) with `facts` in its Verify section; every other byte unchanged."""
    old = "\n".join(_verify_section(None, repo, revision))
    if old not in text:
        raise ShardquantError(f"{CARD_NAME}: no Verify section as shardquant writes it (a card of another "
                              "shardquant version, or edited): convert the output again")
    return text.replace(old, "\n".join(_verify_section(facts, repo, revision)), 1)


# ---------------------------------------------------------------------------------------------
# the card

def model_card(plan, manifest_doc: dict, verify_summary=None, source_readme: str | None = None,
               engines: list | None = None) -> str:
    """The card's text. plan: shardquant/plan.py Plan; manifest_doc: manifest.build()'s document (its
    files table is not read); verify_summary: a verify Report (shardquant/report.py) of this output, or
    None (then the card says how to run verify); source_readme: the source's README.md text, or None;
    engines: engine_verdicts() of the output (else the verify report's, else none are named)."""
    ck = plan.checkpoint
    src = manifest_doc.get("source", {})
    repo, revision = src.get("repo"), src.get("revision")
    name = repo.rsplit("/", 1)[-1] if repo else Path(ck.root).name
    flavor = manifest_doc["flavor"]
    quantizers = manifest_doc["quantizers"]
    fmts = sorted({q["format"] for q in quantizers.values()}, key=lambda f: (f != manifest_doc["format"], f))
    if engines is None and verify_summary is not None and getattr(verify_summary, "engines", None) is not None:
        engines = verify_summary.engines.verdicts
    served = [v for v in engines or [] if v.served]

    carried, body = split_front_matter(source_readme) if source_readme is not None else ({}, None)
    meta: dict[str, object] = {}
    if repo:
        meta["base_model"] = [repo]
        meta["base_model_relation"] = "quantized"
    meta["library_name"] = _library(flavor, engines)
    meta["tags"] = _tags(flavor, fmts)
    for k in CARRIED:
        if k in carried:
            meta[k] = carried[k]

    out = [front_matter(meta)]
    label = " + ".join(f.upper() for f in fmts)
    out += [f"# {_text(name)} ({label}, {flavor})", ""]
    where = (f"[{repo}](https://huggingface.co/{repo})" + (f" at revision `{_text(revision)}`" if revision else "")
             if repo else f"the local checkpoint `{_text(name)}`")
    tool = manifest_doc.get("tool", {})
    out += [f"{'Mixed-precision ' if len(fmts) > 1 else ''}{label} weights of {where}, converted data-free "
            f"(no calibration) by shardquant {tool.get('version', '?')} in the `{flavor}` flavor.", ""]
    arch = (ck.config or {}).get("architectures")
    facts = [f"- Format{'s' * (len(fmts) > 1)}: {', '.join(f'`{f}`' for f in fmts)}; flavor `{flavor}` "
             f"({_flavor_says(flavor)})"]
    if isinstance(arch, list) and arch and all(isinstance(a, str) for a in arch):
        facts.append(f"- Architecture: {', '.join(f'`{_text(a)}`' for a in arch)}")
    if tool.get("recipe"):
        facts.append(f"- Recipe hash: `{tool['recipe']}` (scale_manifest.json `tool.recipe`)")
    out += facts + [""]

    out += _recipe(manifest_doc, fmts) + [""]
    out += _kept(manifest_doc.get("excluded", [])) + [""]
    out += _schemes(fmts, flavor) + [""]
    out += _serving(engines, served, flavor) + [""]
    facts = VerifyFacts.of(verify_summary) if verify_summary is not None else None
    out += _verify_section(facts, repo, revision) + [""]
    out += ["Every quantizer's members, amax and scale, every kept tensor with its reason, and every file's "
            "size and SHA-256 are recorded in `scale_manifest.json`.", ""]
    if body is not None and body.strip():  # a source card of front matter alone has nothing to add
        if len(body.encode()) > MAX_SOURCE_README:
            body = body.encode()[:MAX_SOURCE_README].decode(errors="ignore") + "\n\n*(cut: the original is longer)*"
        out += ["---", "", "## Original model card", "", body.rstrip("\n"), ""]
    return "\n".join(out).rstrip("\n") + "\n"


def _library(flavor: str, engines: list | None) -> str:
    """transformers when it loads this output (its verdict; without verdicts, every flavor but
    modelopt: transformers has no ModelOpt quantizer, docs/formats.md "verify --engine"); else a
    ModelOpt checkpoint names NVIDIA's Model Optimizer, as NVIDIA's own ModelOpt checkpoints on the hub do."""
    tf = next((v for v in engines or [] if v.engine.name == "transformers"), None)
    loads = tf.served if tf is not None else flavor != "modelopt"
    return "Model Optimizer" if not loads and flavor == "modelopt" else "transformers"


def _tags(flavor: str, fmts: list[str]) -> list[str]:
    tags = [{"block-fp8": "fp8"}.get(flavor, flavor)]  # modelopt, compressed-tensors: the hub's own tags
    for f in fmts:
        d = formats.declared(f)
        tags += [f, f"fp{d.num_bits}"]
    tags += ["quantized", "shardquant"]
    return list(dict.fromkeys(tags))


def _flavor_says(flavor: str) -> str:
    return {"modelopt": "`quant_method: modelopt`, `hf_quant_config.json`",
            "compressed-tensors": "`quant_method: compressed-tensors`",
            "block-fp8": "`quant_method: fp8`, `weight_block_size: [128, 128]`"}.get(flavor, "")


def _recipe(doc: dict, fmts: list[str]) -> list[str]:
    by_fmt: dict[str, list[dict]] = defaultdict(list)
    for q in doc["quantizers"].values():
        by_fmt[q["format"]].append(q)
    out = ["## Recipe", "", "| format | quantizers | weights | parts of the model |", "|---|---:|---:|---|"]
    for f in fmts:
        qs = by_fmt[f]
        parts = Counter(_part(q["rule"]) for q in qs)
        shown = ", ".join(f"{p} ({n})" for p, n in sorted(parts.items(), key=lambda kv: (-kv[1], kv[0])))
        out.append(f"| `{f}` | {len(qs)} | {sum(len(q['members']) for q in qs)} | {_cell(shown)} |")
    policy = doc.get("expert_policy", "shared")
    scaled = [f for f in fmts if formats.declared(f).quantizer_scale]
    what = ("all experts of a MoE layer share one scale per projection (fused sets such as q/k/v and gate/up "
            "always share one)" if policy == "shared" else
            "each expert has its own scale (fused sets such as q/k/v and gate/up share one)")
    note = "" if scaled else (f"; no effect on {', '.join(f'`{f}`' for f in fmts)}, which "
                              f"{'has' if len(fmts) == 1 else 'have'} block scales only, no per-quantizer scale")
    out += ["", f"Expert policy `{policy}`: {what}{note}. A quantizer is the set of weights that share one "
            "scale."]
    return out


def _part(rule: str) -> str:
    kind = _RULE_KIND.get(rule)
    return _KIND_LABEL[kind] if kind else f"rule {_text(rule)}"


def _kept(excluded: list[dict]) -> list[str]:
    out = ["## Kept in high precision", ""]
    if not excluded:
        return out + ["Nothing: every tensor is quantized."]
    by: dict[str, list[str]] = defaultdict(list)
    for e in excluded:
        reason = str(e.get("reason") or "kept").split(": ", 1)[0]  # "fused set not quantizable: <detail>"
        by[reason].append(str(e["name"]))
    out += [f"{len(excluded)} tensor{'s' * (len(excluded) != 1)} keep their source dtype:", ""]
    for reason, names in sorted(by.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        line = f"- {_text(reason)}: {len(names)}"
        if len(names) <= NAMES_SHOWN:
            line += " (" + ", ".join(_code(n) for n in sorted(names)) + ")"
        out.append(line)
    return out


def _schemes(fmts: list[str], flavor: str) -> list[str]:
    fl = FLAVORS[flavor]
    out = ["## Weights and activations", "", "| format | weights | weight scales | tensors per linear | activations |",
           "|---|---|---|---|---|"]
    for f in fmts:
        d = formats.declared(f)
        roles = fl.output_names(f, "m.weight")
        tensors = ", ".join(f"`{roles[r].removeprefix('m.')}`" for r in ("weight", "scale", "global_scale")
                            if r in roles)
        out.append(f"| `{f}` | {d.element} ({d.num_bits}-bit{', two per byte' if d.elems_per_byte == 2 else ''}) | "
                   f"{_cell(_scales(d, flavor))} | {tensors} | {_cell(_activations(d))} |")
    return out


def _scales(d, flavor: str) -> str:
    sd = _DTYPE.get(d.scale_dtype, d.scale_dtype)
    if d.block:
        s = f"one {sd} scale per {d.block[0]}x{d.block[1]} tile"
    elif d.granularity == "group":
        s = f"one {sd} scale per {d.block_size} weights along the input"
    elif d.granularity == "row":
        s = f"one {sd} scale per output row"
    else:
        row = (d.spelling(flavor) or {}).get("tensor_scale") == "row"
        s = f"one {sd} scale per quantizer" + (", written on every output row" if row else "")
    if d.global_scale:
        s += ", and one fp32 global scale per quantizer"
    return s


def _activations(d) -> str:
    if d.activations == "none":
        return f"not quantized: W{d.num_bits}A16, activations stay in the model's dtype"
    if d.activations == "dynamic-token":
        return "FP8, one scale per token, computed at run time (dynamic)"
    if d.activations == "dynamic-group":
        n = d.block[1] if d.block else d.block_size
        return f"FP8, one scale per {n} values of each token, computed at run time (dynamic)"
    return _text(d.activations)


def _serving(engines: list | None, served: list, flavor: str) -> list[str]:
    out = ["## Serving", ""]
    if engines is None:
        return out + ["Run `shardquant verify <model>` to see which engines serve this checkpoint."]
    if not served:
        return out + ["No engine serves this checkpoint according to shardquant's engine rules "
                      "(shardquant/engine_rules); `shardquant verify <model>` says why."]
    out += ["Which engines load it correctly follows shardquant's engine rule tables (the loader facts of "
            "docs/formats.md, at the engine versions they name) applied to this checkpoint's config and headers. "
            f"`{MODEL}` is this directory, or the hub repo it is uploaded to.", ""]
    for v in served:
        out += [f"### {_text(v.engine.label)}", ""]
        notes = _notes(v)
        if notes:
            out += notes + [""]
        lines = _serve_lines(v.engine.name, flavor)
        if lines:
            out += lines + [""]
    others = [v for v in engines if not v.served]
    if others:
        out.append("Not served: " + "; ".join(
            f"{_text(v.engine.label)} {v.status.lower()}"
            + (f" ({', '.join(f'`{r}`' for r in dict.fromkeys(f.rule.qualified for f in v.findings if f.blocking))})"
               if any(f.blocking for f in v.findings) else "")
            for v in others) + ".")
    return out


def _notes(v) -> list[str]:
    """Caveats (a rule with a runtime condition) and degraded-accuracy findings, one line per rule."""
    out = []
    for f in v.findings:
        line = f"- `{f.rule.qualified}`: {_text(f.rule.requires)}"
        if f.rule.when:
            line += f" (when {_text(f.rule.when)})"
        if line not in out:
            out.append(line)
    return (["Caveats:", ""] + out) if out else []


def _verify_section(facts: VerifyFacts | None, repo: str | None, revision: str | None) -> list[str]:
    out = ["## Verify", ""]
    src = repo or "<source directory>"
    cmd = f"shardquant verify {MODEL} --source {src}" + (f" --revision {revision}" if repo and revision else "")
    how = [f"`shardquant verify {MODEL}` checks every file's size and SHA-256 against `scale_manifest.json`, the "
           "format's contract (names, dtypes, shapes, scales) and each engine's loading rules; "
           f"`{cmd}` also compares every quantized tensor with its source (SQNR) and every kept tensor byte for byte."]
    if facts is None:
        return out + how
    if facts.ok:
        got = f"passed: {facts.modules} quantized modules"
        if facts.files is not None:
            got += f", {facts.files} files" + (" (SHA-256)" if facts.hashed else " (sizes)")
    else:
        got = f"FAILED: {facts.violations} violation(s) of {', '.join(facts.rules)}"
    out += [f"`shardquant verify` on this output {_text(got)}.", ""]
    if facts.tensors:
        worst = f"{_db(facts.worst_sqnr_db)} (" + _code(facts.worst_tensor or "") + ")"
        out += [f"Against its source: {facts.tensors} quantized tensors, SQNR {_db(facts.overall_sqnr_db)} overall, "
                f"worst {worst}" + (f", floor {_db(facts.min_sqnr_db)}" if facts.min_sqnr_db is not None else "")
                + ".", ""]
    if facts.engines:
        out += ["Engines: " + "; ".join(f"{_text(label)} {_text(status)}" for label, status in facts.engines) + ".",
                ""]
    return out + how


def _db(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} dB" if math.isfinite(x) else _text(str(x))


# ---------------------------------------------------------------------------------------------
# text from the checkpoint, made safe for Markdown

def _text(s: object) -> str:
    """A name or phrase from the checkpoint or its records, one printable line (text.show) with the
    characters that would start Markdown or HTML markup escaped."""
    t = show(str(s), quote=False)
    return re.sub(r"([\\`*_\[\]<>|#])", r"\\\1", t)


def _code(s: str) -> str:
    """A name as a code span (one printable line; a backtick inside gets a longer fence)."""
    t = show(s, quote=False)
    run = max((len(m) for m in re.findall(r"`+", t)), default=0)
    fence = "`" * (run + 1)
    pad = " " if run else ""
    return f"{fence}{pad}{t}{pad}{fence}".replace("|", "\\|")


def _cell(s: str) -> str:
    return s.replace("|", "\\|")
