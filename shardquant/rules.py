"""Tensor-name rules: one ordered table of full-match regexes that decides, for every tensor,
whether it is quantized and under which logical quantizer (the tensors that share one scale).

A rule's `key` is a template over the regex's named groups. `{expert}` stands for the expert index:
under the `shared` expert policy it becomes `*`, so all experts of a layer share one quantizer;
under `per-expert` it keeps the index. `fuse` lists the values the `proj` group must take for a
quantizer to be complete (q/k/v, gate/up, w1/w3, ...): a quantizer missing one is an error.
"""

from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RuleError
from .text import show, show_path

QUANTIZE, KEEP = "quantize", "keep"
EXPERT_POLICIES = ("shared", "per-expert")
FLOAT_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class Rule:
    name: str
    pattern: str
    action: str
    key: str = ""
    fuse: tuple[str, ...] = ()
    reason: str = ""
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            rx = re.compile(self.pattern)
        except re.error as e:
            raise RuleError(f"rule {show(self.name)}: bad regex {show(self.pattern)} ({e})") from None
        object.__setattr__(self, "regex", rx)
        if self.action not in (QUANTIZE, KEEP):
            raise RuleError(f"rule {show(self.name)}: action must be 'quantize' or 'keep', not {show(self.action)}")
        if self.action == QUANTIZE:
            if not self.key:
                raise RuleError(f"rule {show(self.name)}: a quantize rule needs a key template")
            try:
                fields = {f for _, f, _, _ in string.Formatter().parse(self.key) if f is not None}
            except ValueError as e:  # e.g. an unclosed "{prefix"
                raise RuleError(f"rule {show(self.name)}: bad key template {show(self.key)} ({e})") from None
            unknown = fields - set(rx.groupindex)
            if unknown:
                raise RuleError(f"rule {show(self.name)}: key uses [{', '.join(show(u) for u in sorted(unknown)[:8])}] "
                                "not named in the pattern")
            try:  # conversions and format specs ("{proj!x}", "{proj:d}") fail only when formatting
                self.key.format(**{g: "0" for g in rx.groupindex})
            except ValueError as e:
                raise RuleError(f"rule {show(self.name)}: bad key template {show(self.key)} ({e})") from None
            if self.fuse and "proj" not in rx.groupindex:
                raise RuleError(f"rule {show(self.name)}: fuse needs a named group 'proj' in the pattern")


_L = r"(?P<prefix>.*\.(?:self_attn|self_attention|attn|attention))"
_MLP = r"(?P<prefix>.*\.(?:mlp|feed_forward))"

# Order matters: the first full match wins. Keep rows come first, so that e.g. a router named
# `mlp.gate` is never mistaken for a projection.
BUILTIN_RULES: tuple[Rule, ...] = (
    Rule("vision", r"(?:.*\.)?(?:vision_tower|vision_model|visual|vision_encoder|multi_modal_projector|audio_tower)\..*", KEEP, reason="vision tower"),
    Rule("mtp", r"(?:.*\.)?mtp\..*", KEEP, reason="MTP layer"),
    Rule("bias", r".*\.bias", KEEP, reason="bias"),
    Rule("fused-expert-bias", r".*\.experts\.(?:gate_up_proj|down_proj)_bias", KEEP, reason="bias"),  # gpt-oss [E, out]
    # `embed` / `head`: DeepSeek-V4's flat names (../shared/LAYOUTS.md "DeepSeek-V4")
    Rule("embedding", r"(?:.*\.)?(?:embed_tokens|word_embeddings|wte|tok_embeddings|embed)\.weight", KEEP, reason="embedding"),
    Rule("head", r"(?:.*\.)?(?:lm_head|output_layer|shared_head\.head|head)\.weight", KEEP, reason="output head"),
    Rule("norm", r".*(?:norm|ln_[a-z0-9]+)[a-z0-9_]*\.weight", KEEP, reason="norm"),
    Rule("router", r".*\.(?:mlp\.gate|block_sparse_moe\.gate|ffn\.gate|router|mlp\.router|feed_forward\.router)\.(?:weight|e_score_correction_bias)", KEEP, reason="router"),
    # DeepSeek-V4 attention's compressor and the indexer's head weights stay in high precision there
    Rule("v4_attn_kept", r".*\.attn\.(?:compressor\..*|indexer\.weights_proj\.weight|attn_sink)", KEEP, reason="attention compressor / indexer weights"),
    Rule("shared_expert_gate", r".*\.shared_expert_gate\.weight", KEEP, reason="shared expert gate"),
    # attention
    Rule("attn_qkv", _L + r"\.(?P<proj>q_proj|k_proj|v_proj)\.weight", QUANTIZE, "{prefix}.qkv_proj", ("q_proj", "k_proj", "v_proj")),
    Rule("mla_a", _L + r"\.(?P<proj>q_a_proj|kv_a_proj_with_mqa)\.weight", QUANTIZE, "{prefix}.q_a_kv_a_proj", ("q_a_proj", "kv_a_proj_with_mqa")),
    Rule("attn_other", _L + r"\.(?P<proj>o_proj|q_b_proj|kv_b_proj)\.weight", QUANTIZE, "{prefix}.{proj}"),
    Rule("attn_fused_qkv", _L + r"\.(?P<proj>qkv_proj|query_key_value|Wqkv)\.weight", QUANTIZE, "{prefix}.{proj}"),
    Rule("te_attn", r"(?P<prefix>.*\.self_attention)\.(?P<proj>linear_qkv|linear_proj)\.weight", QUANTIZE, "{prefix}.{proj}"),
    # DeepSeek-V4: wq_a and wkv both read the hidden state (as V3's q_a / kv_a): one quantizer
    Rule("v4_attn_a", _L + r"\.(?P<proj>wq_a|wkv)\.weight", QUANTIZE, "{prefix}.wq_a_wkv", ("wq_a", "wkv")),
    Rule("v4_attn_other", _L + r"\.(?P<proj>wq_b|wo_a|wo_b|indexer\.wq_b)\.weight", QUANTIZE, "{prefix}.{proj}"),
    # routed experts
    Rule("experts_gate_up", _MLP + r"\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj)\.weight", QUANTIZE, "{prefix}.experts.{expert}.gate_up_proj", ("gate_proj", "up_proj")),
    Rule("experts_down", _MLP + r"\.experts\.(?P<expert>\d+)\.(?P<proj>down_proj)\.weight", QUANTIZE, "{prefix}.experts.{expert}.down_proj"),
    Rule("mixtral_w13", r"(?P<prefix>.*\.(?:block_sparse_moe|ffn))\.experts\.(?P<expert>\d+)\.(?P<proj>w1|w3)\.weight", QUANTIZE, "{prefix}.experts.{expert}.w13", ("w1", "w3")),
    Rule("mixtral_w2", r"(?P<prefix>.*\.(?:block_sparse_moe|ffn))\.experts\.(?P<expert>\d+)\.(?P<proj>w2)\.weight", QUANTIZE, "{prefix}.experts.{expert}.w2"),
    Rule("te_experts", r"(?P<prefix>.*\.experts\.(?P<proj>linear_fc1|linear_fc2))\.weight(?P<expert>\d+)", QUANTIZE, "{prefix}.weight{expert}"),
    # shared experts and dense MLPs
    Rule("shared_expert_gate_up", _MLP + r"\.(?P<sub>shared_experts?)\.(?P<proj>gate_proj|up_proj)\.weight", QUANTIZE, "{prefix}.{sub}.gate_up_proj", ("gate_proj", "up_proj")),
    Rule("shared_expert_down", _MLP + r"\.(?P<sub>shared_experts?)\.down_proj\.weight", QUANTIZE, "{prefix}.{sub}.down_proj"),
    Rule("v4_shared_w13", r"(?P<prefix>.*\.ffn)\.shared_experts\.(?P<proj>w1|w3)\.weight", QUANTIZE, "{prefix}.shared_experts.w13", ("w1", "w3")),
    Rule("v4_shared_w2", r"(?P<prefix>.*\.ffn)\.shared_experts\.(?P<proj>w2)\.weight", QUANTIZE, "{prefix}.shared_experts.w2"),
    Rule("mlp_gate_up", _MLP + r"\.(?P<proj>gate_proj|up_proj)\.weight", QUANTIZE, "{prefix}.gate_up_proj", ("gate_proj", "up_proj")),
    Rule("mlp_down", _MLP + r"\.down_proj\.weight", QUANTIZE, "{prefix}.down_proj"),
    Rule("mlp_fused_gate_up", _MLP + r"\.(?P<proj>gate_up_proj)\.weight", QUANTIZE, "{prefix}.{proj}"),
    Rule("te_mlp", r"(?P<prefix>.*\.mlp\.(?P<proj>linear_fc1|linear_fc2))\.weight", QUANTIZE, "{prefix}"),
)

# What `--format-for KIND=FORMAT` names: the built-in rows by the part of the model they claim.
KINDS: dict[str, tuple[str, ...]] = {
    "attention": ("attn_qkv", "mla_a", "attn_other", "attn_fused_qkv", "te_attn", "v4_attn_a", "v4_attn_other"),
    "experts": ("experts_gate_up", "experts_down", "mixtral_w13", "mixtral_w2", "te_experts"),
    "shared-experts": ("shared_expert_gate_up", "shared_expert_down", "v4_shared_w13", "v4_shared_w2"),
    "mlp": ("mlp_gate_up", "mlp_down", "mlp_fused_gate_up", "te_mlp"),
}
KEEP_FORMAT = "keep"  # --format-for ...=keep: left in high precision


@dataclass(frozen=True)
class FormatChoice:
    """`SELECTOR=FORMAT`: the quantizers a selector picks take FORMAT instead of --format (mixed
    precision). SELECTOR is a kind (KINDS), a rule name, or else a regex full-matched against the
    tensor's name or its module's name. FORMAT is a registered format or `keep`."""

    selector: str
    format: str
    regex: re.Pattern | None = field(default=None, repr=False, compare=False)

    def picks(self, name: str, rule: str) -> bool:
        if self.selector in KINDS:
            return rule in KINDS[self.selector]
        if self.selector == rule:
            return True
        return self.regex is not None and any(self.regex.fullmatch(n) for n in (name, module_name(name)))


def format_choice(spec: str, known: tuple[str, ...], where: str = "--format-for") -> FormatChoice:
    """Parse `SELECTOR=FORMAT` (FORMAT one of `known` or `keep`, any case)."""
    selector, sep, fmt = spec.rpartition("=")
    fmt = fmt.strip().lower()
    if not sep or not selector.strip():
        raise RuleError(f"{where} {show(spec)}: expected SELECTOR=FORMAT (e.g. attention=fp8-block)")
    if fmt not in known and fmt != KEEP_FORMAT:
        raise RuleError(f"{where} {show(spec)}: unknown format {show(fmt)}; choose one of "
                        f"{', '.join(known)} or {KEEP_FORMAT}")
    selector = selector.strip()
    rx = None
    if selector not in KINDS and selector not in _RULE_NAMES:
        rx = _compile(selector, f"{where} {show(spec)}:")
    return FormatChoice(selector, fmt, rx)


_NUMBERS = re.compile(r"(?<=\.)[0-9]+(?=\.)")  # a dot-delimited number: a layer's or an expert's index
_FIRST_BUILTIN: dict[str, int] = {}  # a name's shape (_NUMBERS made 0) -> its first BUILTIN_RULES row, -1 for none
_LAYER = re.compile(r"(?:.*\.)?layers\.(\d+)\..*")
_RULE_NAMES = frozenset(r.name for r in BUILTIN_RULES) | {"--include"}
TE_WEIGHT = re.compile(r"(?P<base>.*)\.weight(?P<idx>\d+)")  # TransformerEngine grouped `m.weight{E}`: module m


def module_name(name: str) -> str:
    """The module a weight belongs to, as engines name it in exclude lists: `m.weight` -> `m`,
    TE `m.weight{E}` -> `m`, a fused parameter such as `m.experts.gate_up_proj` -> `m.experts`."""
    te = TE_WEIGHT.fullmatch(name)
    if te:
        return te["base"]
    if name.endswith(".weight"):
        return name.removesuffix(".weight")
    return name.rsplit(".", 1)[0]


@dataclass(frozen=True)
class Decision:
    """What the rules say about one tensor."""

    action: str
    rule: str  # rule name, or a marker such as "--exclude" / "unclaimed"
    key: str | None = None
    reason: str = ""
    proj: str | None = None
    expert: str | None = None
    fuse: tuple[str, ...] = ()
    warn: bool = False  # kept for a reason the user should hear about


class RuleSet:
    """The built-in table, user rows in front of it, and the --include / --exclude patterns."""

    def __init__(
        self,
        user_rules: tuple[Rule, ...] = (),
        include: tuple[str, ...] = (),
        exclude: tuple[str, ...] = (),
        expert_policy: str = "shared",
        num_layers: int | None = None,
        format_for: tuple[FormatChoice, ...] = (),
    ):
        if expert_policy not in EXPERT_POLICIES:
            raise RuleError(f"expert policy must be one of {EXPERT_POLICIES}, not {show(expert_policy)}")
        self.user = tuple(user_rules)
        self.rules = self.user + BUILTIN_RULES
        self.include = tuple(_compile(p, "--include") for p in include)
        self.exclude = tuple(_compile(p, "--exclude") for p in exclude)
        self.expert_policy = expert_policy
        self.num_layers = num_layers
        self.format_for = tuple(format_for)
        # What the filters did over the tensors classified (unused_filters): user rows and --include
        # patterns that full-matched a name, that decided a tensor; --exclude patterns that kept one.
        self._user_seen = [False] * len(self.user)
        self._user_won = [False] * len(self.user)
        self._inc_seen = [False] * len(self.include)
        self._inc_won = [False] * len(self.include)
        self._exc_won = [False] * len(self.exclude)

    def unused_filters(self) -> list[str]:
        """One message per user row, --include or --exclude pattern that did nothing to the tensors
        classified so far (plan.py: a warning, an error with --strict)."""
        out = []
        for r, seen, won in zip(self.user, self._user_seen, self._user_won):
            if not won:
                what = "matches no tensor name" if not seen else \
                    "decides no tensor: an earlier rule row claims every tensor it matches"
                out.append(f"rule {show(r.name)} (pattern {_typed(r.pattern)}) {what}")
        for rx, seen, won in zip(self.include, self._inc_seen, self._inc_won):
            if not won:
                out.append(f"--include {_typed(rx.pattern)} " + (
                    "matches no tensor or module name" if not seen else
                    "quantizes nothing: every tensor it matches is claimed by a rule or is not a 2-D "
                    "floating-point weight"))
        for rx, won in zip(self.exclude, self._exc_won):
            if not won:
                out.append(f"--exclude {_typed(rx.pattern)} matches no tensor or module name")
        return out

    def format_of(self, name: str, d: Decision) -> FormatChoice | None:
        """The first --format-for / rules-file choice that picks this quantized tensor, or None."""
        return next((c for c in self.format_for if c.picks(name, d.rule)), None)

    def classify(self, name: str, dtype: str, shape: tuple[int, ...]) -> Decision:
        module = name.removesuffix(".weight")  # an --include quantizer's key
        names = (name, module, module_name(name))  # --exclude may name the tensor or its module
        d = self._match(name, dtype, shape, names, module)
        hit = [i for i, rx in enumerate(self.exclude) if any(rx.fullmatch(n) for n in names)]
        for i in hit:
            self._exc_won[i] = True
        if hit:
            # keep the quantizer key: the plan keeps the rest of this fused set with it
            return Decision(KEEP, "--exclude", key=d.key, reason=f"--exclude {self.exclude[hit[0]].pattern}")
        return d

    def _match(self, name: str, dtype: str, shape: tuple[int, ...], names: tuple[str, ...], module: str) -> Decision:
        is_weight = len(shape) == 2 and dtype in FLOAT_DTYPES
        inc = [i for i, rx in enumerate(self.include) if any(rx.fullmatch(n) for n in names)]
        for i in inc:
            self._inc_seen[i] = True
        won = False
        for i, r in enumerate(self.user):  # every user row that matches, not only the first
            if r.regex.fullmatch(name):
                self._user_seen[i] = True
                if not won:
                    self._user_won[i] = won = True
        if (hit := self._first(name)) is not None:
            rule, m = hit
            if rule.action == KEEP:
                return Decision(KEEP, rule.name, reason=rule.reason)
            if self._beyond_last_layer(name):
                return Decision(KEEP, "mtp", reason="MTP layer (index >= num_hidden_layers)")
            if len(shape) != 2:
                return Decision(KEEP, rule.name, reason=f"{len(shape)}-D tensor, not a 2-D weight", warn=len(shape) > 2)
            groups = m.groupdict()
            expert = groups.get("expert")
            fill = dict(groups)
            if expert is not None:
                fill["expert"] = "*" if self.expert_policy == "shared" else expert
            return Decision(
                QUANTIZE, rule.name, rule.key.format(**fill),
                proj=groups.get("proj"), expert=expert, fuse=rule.fuse,
            )
        if self._beyond_last_layer(name):  # e.g. DeepSeek's MTP eh_proj, which no row claims
            return Decision(KEEP, "mtp", reason="MTP layer (index >= num_hidden_layers)")
        if is_weight and inc:
            for i in inc:
                self._inc_won[i] = True
            return Decision(QUANTIZE, "--include", module)
        if is_weight:
            return Decision(KEEP, "unclaimed", reason="no rule claims this 2-D weight", warn=True)
        if len(shape) > 2 and dtype in FLOAT_DTYPES:  # e.g. fused 3-D experts [E, 2I, H]: not supported yet
            return Decision(KEEP, "unclaimed", reason=f"{len(shape)}-D weight: no rule quantizes it", warn=True)
        return Decision(KEEP, "not-a-weight", reason=f"{len(shape)}-D {dtype} tensor")

    def _first(self, name: str) -> tuple[Rule, re.Match] | None:
        """The first row (user rows, then BUILTIN_RULES) whose pattern matches the whole name, with its
        match, or None. Which built-in row matches first is the same for names that
        differ only in their dot-delimited numbers (`layers.7.`, `experts.12.`): no built-in pattern
        tells one number from another there (tests/test_rules.py checks it over every fixture's names),
        so it is found once per such name shape. A checkpoint's tensors are mostly one shape repeated
        per layer and expert: 46,000 tensors of DeepSeek-V3 are under 200 shapes."""
        for rule in self.user:
            if m := rule.regex.fullmatch(name):
                return rule, m
        shape = _NUMBERS.sub("0", name)
        i = _FIRST_BUILTIN.get(shape, -2)
        if i == -2:
            i = _FIRST_BUILTIN[shape] = next((j for j, r in enumerate(BUILTIN_RULES) if r.regex.fullmatch(name)), -1)
        return (BUILTIN_RULES[i], BUILTIN_RULES[i].regex.fullmatch(name)) if i >= 0 else None

    def _beyond_last_layer(self, name: str) -> bool:
        if self.num_layers is None:
            return False
        m = _LAYER.fullmatch(name)
        return m is not None and int(m.group(1)) >= self.num_layers


def _typed(pattern: str) -> str:
    """A pattern in quotes as the user typed it (backslashes single), else escaped as `show` does."""
    return f"'{pattern}'" if pattern.isprintable() and "'" not in pattern and len(pattern) <= 200 else show(pattern)


def _compile(pattern: str, flag: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RuleError(f"{flag} {show(pattern)}: bad regex ({e})") from None


def _read_table(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RuleError(f"{show_path(path)}: cannot read rules file ({show(str(e), quote=False)})") from None
    try:
        if path.suffix == ".json":
            return json.loads(text)
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    except ValueError as e:
        raise RuleError(f"{show_path(path)}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} "
                        f"({show(str(e), quote=False)})") from None


def load_rules(path: Path) -> tuple[Rule, ...]:
    """User rows from a TOML or JSON file: `[[rule]]` tables (or a "rules" list) with
    pattern, action, key, fuse, reason, name. They go in front of the built-in table."""
    return load_rules_file(path, ())[0]


def load_rules_file(path: Path, known_formats: tuple[str, ...]) -> tuple[tuple[Rule, ...], tuple[FormatChoice, ...]]:
    """User rows and format choices from a TOML or JSON file: `[[rule]]` tables (or a "rules" list)
    with pattern, action, key, fuse, reason, name, in front of the built-in table; `[[format]]`
    tables (or a "formats" list) with select and format (mixed precision: see FormatChoice)."""
    data = _read_table(path)
    rows = data.get("rule", data.get("rules", [])) if isinstance(data, dict) else data
    picks = data.get("format", data.get("formats", [])) if isinstance(data, dict) else []
    if isinstance(data, dict) and not set(data) & {"rule", "rules", "format", "formats"}:
        rows = None
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise RuleError(f"{show_path(path)}: expected a list of rules ([[rule]] tables or a \"rules\" array)")
    if not isinstance(picks, list) or not all(isinstance(r, dict) for r in picks):
        raise RuleError(f"{show_path(path)}: expected [[format]] tables (or a \"formats\" array) with select and format")
    out = []
    allowed = {"name", "pattern", "action", "key", "fuse", "reason"}
    for i, r in enumerate(rows):
        extra = set(r) - allowed
        if extra or "pattern" not in r or "action" not in r:
            raise RuleError(f"{show_path(path)}: rule {i}: needs pattern and action; unknown fields "
                            f"[{', '.join(show(x) for x in sorted(extra)[:8])}]")
        fuse = r.get("fuse", [])
        if not isinstance(fuse, list) or not all(isinstance(x, str) for x in fuse):
            raise RuleError(f"{show_path(path)}: rule {i}: fuse must be a list of strings")
        try:
            out.append(Rule(
                str(r.get("name", f"{path.name}:{i}")), str(r["pattern"]), str(r["action"]),
                str(r.get("key", "")), tuple(fuse), str(r.get("reason", "user rule")),
            ))
        except RuleError as e:
            raise RuleError(f"{show_path(path)}: {e}") from None
    choices = []
    for i, r in enumerate(picks):
        if set(r) != {"select", "format"} or not all(isinstance(v, str) for v in r.values()):
            raise RuleError(f"{show_path(path)}: format {i}: needs exactly select and format (strings)")
        choices.append(format_choice(f"{r['select']}={r['format']}", known_formats or (r["format"].lower(),),
                                     f"{show_path(path)}: format {i}"))
    return tuple(out), tuple(choices)
