"""Synthetic already-quantized and fused checkpoints in the real layouts of ../shared/LAYOUTS.md, scaled
down (issue 14): DeepSeek-V3 block FP8, DeepSeek-V4 FP4 experts + UE8M0 block FP8, Kimi-K3
compressed-tensors MXFP4 experts, gpt-oss fused 3-D MXFP4, Llama 4 fused 3-D bf16, and the
transformers-5 fused [E, out, in] layout.

Each builder returns a SourceFixture: the tensor specs and config.json (a testing.Model, written shard by
shard by testing.write_checkpoint, so experts straddle shard boundaries as in the real checkpoints), the
raw storage of every tensor, what every logical weight is (`expected`, stated by the builder, not
derived from shardquant/encoding.py), the fp32 values every float weight decodes to (`reference`,
computed here in float64 from the stored codes: independent of shardquant/decode.py), and where the
edge cases were planted (`planted`).

Quantized data are valid encodings of random normal weights: block FP8 with F32 scales from
formats/fp8_block.py's quantizer, block FP8 with E8M0 scales as a power of two at or above tile amax /
448, MXFP4 from formats/mxfp4.py's quantizer. Planted in every quantized fixture: an all-zero block, a
-0.0 code, a dead (all-zero) expert where there are experts, and in the MXFP4 ones one live block whose
E8M0 exponent is 20 binades below its gate/up group's largest (outside what an E4M3 block scale can
hold relative to s2 = 2^(k_max - 8), so a lossless cast to NVFP4 must re-quantize exactly that block).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import ml_dtypes
import numpy as np

from .encoding import BLOCK_FP8, HALVES, IN_OUT, INTERLEAVED, MXFP4, MXFP4_3D, OUT_IN, PLAIN, PLAIN_3D
from .formats import fp8_block, mxfp4
from .formats.fp8 import e4m3
from .st import STORAGE
from .testing import Model, Spec, write_checkpoint

_E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float64)
_FLOATS = ("BF16", "F16", "F32")
_TILE = 128  # block FP8 tiles, 128x128 (LAYOUTS.md "DeepSeek-V3 / R1" and "DeepSeek-V4")
_MX = 32  # elements per E8M0 scale (LAYOUTS.md "Kimi-K3", "DeepSeek-V4", "gpt-oss")
_EXPERT = re.compile(r"(.*)\.experts\.\d+\..*")  # a tensor of one routed expert, group: its layer
OUT_OF_RANGE_BINADES = 20  # the planted block's exponent below its group's largest; lossless needs <= 17


@dataclass(frozen=True)
class Expected:
    """What a logical weight is, as the fixture built it (compared field by field with SourceEncoding)."""

    kind: str
    data: tuple[str, ...]
    scales: tuple[str, ...] = ()
    shape: tuple[int, ...] = ()
    experts: int | None = None
    orientation: str | None = None
    gate_up: str | None = None


@dataclass
class SourceFixture:
    """One synthetic source checkpoint. reference[name]: fp32 [out, in] (2-D), [E, out, in] (3-D experts,
    logical orientation) or the stored shape (other float tensors). planted: edge case -> locations;
    "out_of_range" entries are (logical name of the gate, expert or None, row, block) with the expert's
    gate and up weights in "groups"."""

    model: Model
    arrays: dict[str, np.ndarray]
    expected: dict[str, Expected]
    reference: dict[str, np.ndarray]
    planted: dict[str, list] = field(default_factory=dict)

    @property
    def config(self) -> dict:
        return self.model.config

    def shard_bytes(self) -> int:
        """Default shard size: just below the bytes of the smallest layer's routed experts where experts
        are tensors of their own, so every layer's experts straddle a shard boundary (as a real layer's
        384 expert tensors often do: LAYOUTS.md "Qwen3-MoE"); 256 KiB otherwise."""
        per_layer: dict[str, int] = {}
        for name, dtype, shape in self.model.specs:
            m = _EXPERT.fullmatch(name)
            if m:
                per_layer[m[1]] = per_layer.get(m[1], 0) + self.arrays[name].nbytes
        return min(per_layer.values()) - 1 if per_layer else 256 << 10

    def write(self, root: Path, shard_bytes: int | None = None, **kw) -> Path:
        """Write the checkpoint (shards, index, config.json, tokenizer files) to `root`."""
        return write_checkpoint(root, self.model, shard_bytes=shard_bytes or self.shard_bytes(),
                                data=lambda spec, rng: self.arrays[spec[0]], **kw)


# ---------------------------------------------------------------------------------------------
# Encodings and their float64 references


def _bf16(x: np.ndarray) -> np.ndarray:
    u = np.asarray(x, np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)  # RNE


def _float_values(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _e4m3_f64(codes: np.ndarray) -> np.ndarray:
    return codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)


def _tiles(s: np.ndarray, rows: int, cols: int) -> np.ndarray:
    return np.repeat(np.repeat(s, _TILE, axis=0), _TILE, axis=1)[:rows, :cols]


def block_fp8_reference(codes: np.ndarray, scales: np.ndarray, scale_fmt: str) -> np.ndarray:
    """E4M3 value x tile scale in float64 (exact: 4 significant bits times 24 or a power of two), then
    one rounding to fp32: the correctly rounded fp32 product."""
    s = np.ldexp(1.0, scales.astype(np.int64) - 127) if scale_fmt == "E8M0" else scales.astype(np.float64)
    return (_e4m3_f64(codes) * _tiles(s, *codes.shape)).astype(np.float32)


def mx_reference(packed: np.ndarray, e8m0: np.ndarray) -> np.ndarray:
    """E2M1 (low nibble = even element) x 2^(b - 127) in float64, exact, cast once to fp32."""
    p = packed.view(np.uint8)
    codes = np.stack([p & 15, p >> 4], axis=-1).reshape(p.shape[0], -1)
    return (_E2M1[codes] * np.repeat(np.ldexp(1.0, e8m0.astype(np.int64) - 127), _MX, axis=1)).astype(np.float32)


def _fp8_e8m0(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Block FP8 with UE8M0 tile scales (LAYOUTS.md "DeepSeek-V4", config scale_fmt "ue8m0"): the scale is
    the least power of two >= tile amax / 448, so W / scale is exact and within E4M3's range; a zero
    tile takes 2^0."""
    rows, cols = w.shape
    gh, gw = -(-rows // _TILE), -(-cols // _TILE)
    pad = np.zeros((gh * _TILE, gw * _TILE), np.float32)
    pad[:rows, :cols] = np.abs(w)
    amax = pad.reshape(gh, _TILE, gw, _TILE).max(axis=(1, 3)) / np.float32(448)
    mant, exp = np.frexp(amax.astype(np.float64))
    k = np.where(amax == 0, 0, np.where(mant == 0.5, exp - 1, exp))
    codes = e4m3(w / _tiles(np.ldexp(1.0, k), rows, cols).astype(np.float32))
    return codes, (k + 127).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The builder every fixture uses


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.specs: list[Spec] = []
        self.arrays: dict[str, np.ndarray] = {}
        self.expected: dict[str, Expected] = {}
        self.reference: dict[str, np.ndarray] = {}
        self.planted: dict[str, list] = {}

    def normal(self, shape, std: float = 0.02) -> np.ndarray:
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(std)

    def _add(self, name: str, dtype: str, raw: np.ndarray) -> None:
        assert name not in self.arrays, name
        raw = np.ascontiguousarray(raw).view(STORAGE[dtype])
        self.specs.append((name, dtype, tuple(raw.shape)))
        self.arrays[name] = raw

    def plant(self, what: str, where) -> None:
        self.planted.setdefault(what, []).append(where)

    def plain(self, name: str, shape, dtype: str = "BF16", std: float = 0.02, raw: np.ndarray | None = None,
              high: int = 0) -> np.ndarray:
        """A tensor kept in high precision (or an integer table, values in [0, high))."""
        if raw is None:
            if dtype in _FLOATS:
                x = self.normal(shape, std)
                raw = _bf16(x) if dtype == "BF16" else x.astype(np.float16 if dtype == "F16" else np.float32)
            else:
                raw = self.rng.integers(0, max(high, 1), shape).astype(STORAGE[dtype])
        self._add(name, dtype, raw)
        if dtype in _FLOATS:
            self.reference[name] = _float_values(raw, dtype)
        self.expected[name] = Expected(PLAIN, (name,), shape=tuple(raw.shape))
        return raw

    def norm(self, name: str, n: int, dtype: str = "BF16") -> None:
        self.plain(name, (n,), dtype, raw=_bf16(1 + self.normal(n, 0.05)) if dtype == "BF16" else None)

    def fp8(self, name: str, shape, scale_name: str, scale_fmt: str, edit=None) -> None:
        """A block-FP8 weight `name` ([out, in], F8_E4M3) and its tile scales: F32 (DeepSeek-V3,
        `weight_scale_inv`) or E8M0 (DeepSeek-V4, `.scale`). edit(codes, scales) plants edge cases."""
        w = self.normal(shape)
        if scale_fmt == "F32":
            codes, scales = fp8_block.Quantizer().quantize(w, "F32", name)
        else:
            codes, scales = _fp8_e8m0(w)
        if edit is not None:
            edit(codes, scales)
        self._add(name, "F8_E4M3", codes)
        self._add(scale_name, "F32" if scale_fmt == "F32" else "F8_E8M0", scales)
        self.reference[name] = block_fp8_reference(codes, scales, scale_fmt)
        self.expected[name] = Expected(BLOCK_FP8, (name,), (scale_name,), tuple(shape))

    def mx(self, shape) -> tuple[np.ndarray, np.ndarray]:
        """(packed uint8 [out, in/2], E8M0 bytes [out, in/32]) of a random weight (formats/mxfp4.py)."""
        return mxfp4.Quantizer().quantize(self.normal(shape), "F32", "w")

    def mx_weight(self, logical: str, data: str, scale: str, data_dtype: str, scale_dtype: str,
                  packed: np.ndarray, e8m0: np.ndarray) -> None:
        self._add(data, data_dtype, packed)
        self._add(scale, scale_dtype, e8m0)
        self.reference[logical] = mx_reference(packed, e8m0)
        self.expected[logical] = Expected(MXFP4, (data,), (scale,), (packed.shape[0], packed.shape[1] * 2))

    def mx_experts(self, logical: list[tuple[str, str, str]], shapes: list[tuple[int, int]], data_dtype: str,
                   scale_dtype: str, *, dead: bool = False, dead_byte: int = 1, plant: frozenset = frozenset()) -> None:
        """One routed expert's gate, down, up (`logical` = [(logical, data, scale)] in w1, w2, w3 order, the
        order the checkpoints store them) in MXFP4, with the edge cases named in `plant`."""
        enc = [self.mx(s) for s in shapes]
        if dead:
            for packed, e8m0 in enc:
                packed[:] = 0
                e8m0[:] = dead_byte
            self.plant("dead_expert", logical[0][0])
        gate, up = enc[0], enc[2]
        if "zero_block" in plant:  # an all-zero block in a live expert (its scale byte kept)
            gate[0][1, 16:32] = 0
            self.plant("zero_block", (logical[0][0], None, 1, 1))
        if "neg_zero" in plant:  # element 0 of row 2 of up is -0.0 (code 8, low nibble)
            up[0][2, 0] = (up[0][2, 0] & 0xF0) | 0x08
            self.plant("neg_zero", (logical[2][0], None, 2, 0))
        if "out_of_range" in plant:
            self.plant("out_of_range", (logical[0][0], None, *_plant_out_of_range(gate, up)))
            self.planted.setdefault("groups", []).append((logical[0][0], logical[2][0]))
        for (name, data, scale), (packed, e8m0) in zip(logical, enc):
            self.mx_weight(name, data, scale, data_dtype, scale_dtype, packed, e8m0)

    def fixture(self, config: dict) -> SourceFixture:
        return SourceFixture(Model(self.specs, config), self.arrays, self.expected, self.reference, self.planted)


def _plant_out_of_range(gate: tuple[np.ndarray, np.ndarray], up: tuple[np.ndarray, np.ndarray]) -> tuple[int, int]:
    """Give one live block of `gate` (packed, e8m0) an exponent OUT_OF_RANGE_BINADES below the gate/up
    group's largest byte, at a block that is not the largest (so the group's largest stays put), every
    element of it non-zero. Returns its (row, block)."""
    top = int(max(gate[1].max(), up[1].max()))
    rows, blocks = np.nonzero(gate[1] < top)
    r, b = int(rows[-1]), int(blocks[-1])
    gate[1][r, b] = top - OUT_OF_RANGE_BINADES
    gate[0][r, b * 16:(b + 1) * 16] |= 0x11  # an odd magnitude code in every nibble
    return r, b


def _fp8_edges(b: _Builder, name: str, one: float | int):
    """An edit planting, in block-FP8 weight `name`, an all-zero tile (0, 0) with scale 1 (`one`: 1.0 or
    E8M0 byte 127) and a -0.0 code (0x80) in the next tile along the longer dim."""
    def edit(codes: np.ndarray, scales: np.ndarray) -> None:
        codes[:_TILE, :_TILE] = 0
        scales[0, 0] = one
        at = (1, _TILE + 2) if codes.shape[1] > _TILE else (_TILE + 2, 1)
        codes[at] = 0x80
        b.plant("neg_zero", (name, None, *at))

    b.plant("zero_block", (name, None, 0, 0))
    return edit


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3 / R1 (Kimi-K2 has the same layout)

_V3_FP8 = ("self_attn.q_a_proj", "self_attn.q_b_proj", "self_attn.kv_a_proj_with_mqa", "self_attn.kv_b_proj",
           "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def deepseek_v3_fp8(hidden=256, layers=3, dense_layers=1, experts=4, inter=128, dense_inter=256, vocab=256,
                    q_lora=128, kv_lora=128, rope=64, nope=128, v_dim=128, heads=2, mtp=1, seed=0) -> SourceFixture:
    """DeepSeek-V3 as shipped (LAYOUTS.md "DeepSeek-V3 / R1"): every linear of the attention and MLPs
    (routed, shared and dense) F8_E4M3 + `weight_scale_inv` F32 [ceil(out/128), ceil(in/128)]; router
    `mlp.gate.weight` BF16 and `e_score_correction_bias` F32; embeddings, norms, lm_head and the MTP
    layer's eh_proj / shared_head BF16. Layer `layers` is the MTP layer. kv_a_proj_with_mqa is
    [kv_lora + rope, hidden] = [192, 256]: not a whole number of tiles, as the real [576, 7168]."""
    from .testing import deepseek_v3

    shape = deepseek_v3(hidden, layers, dense_layers, experts, inter, dense_inter, vocab, q_lora, kv_lora, rope,
                        nope, v_dim, heads, mtp)
    b = _Builder(seed)
    zero_tile = f"model.layers.{dense_layers}.mlp.experts.0.gate_proj.weight"
    dead = f"model.layers.{layers - 1}.mlp.experts.{experts - 1}."
    for name, dtype, dims in shape.specs:
        stem = name[: -len(".weight")]
        if not name.endswith(".weight") or not stem.endswith(_V3_FP8) and ".experts." not in stem \
                and ".shared_experts." not in stem:
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                b.norm(name, dims[0], dtype)
            else:
                b.plain(name, dims, dtype)
            continue
        edit = None
        if name == zero_tile:
            edit = _fp8_edges(b, name, 1.0)
        elif name.startswith(dead):
            edit = lambda c, s: (c.fill(0), s.fill(1.0))  # noqa: E731
            if name.endswith("gate_proj.weight"):
                b.plant("dead_expert", name)
        b.fp8(name, dims, f"{stem}.weight_scale_inv", "F32", edit)
    cfg = dict(shape.config)
    cfg.update({
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "n_shared_experts": 1, "num_experts_per_tok": 2, "num_attention_heads": heads, "num_key_value_heads": heads,
        "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v_dim, "moe_layer_freq": 1,
        "n_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
        "routed_scaling_factor": 2.5, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "rope_theta": 10000,
        "tie_word_embeddings": False, "hidden_act": "silu",
        "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                "weight_block_size": [128, 128]},
    })
    return b.fixture(cfg)


# ---------------------------------------------------------------------------------------------
# DeepSeek-V4


def deepseek_v4(hidden=256, layers=3, experts=4, inter=128, vocab=256, heads=2, head_dim=128, rope=64, q_lora=128,
                o_groups=2, o_lora=128, index_heads=2, index_head_dim=64, hash_layers=1, compress_ratios=(0, 4, 128, 0),
                mtp=1, hc=2, topk=2, seed=1) -> SourceFixture:
    """DeepSeek-V4 (LAYOUTS.md "DeepSeek-V4"): DeepSeek's flat names without `model.`; routed experts
    `layers.{L}.ffn.experts.{E}.w1|w2|w3.weight` I8 (FP4 E2M1 packed, low nibble first) + `.scale`
    F8_E8M0 [out, in/32]; wq_a, wq_b, wkv, wo_a, wo_b, shared experts, indexer.wq_b and the MTP e_proj /
    h_proj block FP8 + `.scale` F8_E8M0 per 128x128 tile; embed, head, norms, the router
    (`ffn.gate.weight` BF16, `ffn.gate.bias` F32, `ffn.gate.tid2eid` I64 on the first `hash_layers`
    layers instead of the bias), attn_sink, compressor (layers of compress ratio 4 or 128: ape, wkv,
    wgate, norm; coff 2 at ratio 4) and indexer (ratio 4) weights, and the hyper-connection `hc_*`
    tensors in high precision. `mtp.{k}` holds the MTP blocks (compress_ratios has one entry per layer
    and per MTP block)."""
    assert len(compress_ratios) == layers + mtp
    b = _Builder(seed)
    H = hidden

    def fp8(name: str, shape, edit=None) -> None:
        b.fp8(f"{name}.weight", shape, f"{name}.scale", "E8M0", edit)

    def block(p: str, ratio: int, hashed: bool, index: int) -> None:
        mix = (2 + hc) * hc
        for hname in ("hc_attn", "hc_ffn"):
            b.plain(f"{p}.{hname}_fn", (mix, hc * H), "F32")
            b.plain(f"{p}.{hname}_base", (mix,), "F32")
            b.plain(f"{p}.{hname}_scale", (3,), "F32")
        b.norm(f"{p}.attn_norm.weight", H)
        b.norm(f"{p}.ffn_norm.weight", H)
        b.plain(f"{p}.attn.attn_sink", (heads,), "F32")
        fp8(f"{p}.attn.wq_a", (q_lora, H))
        b.norm(f"{p}.attn.q_norm.weight", q_lora)
        edges = None
        if index == 0:
            edges = _fp8_edges(b, f"{p}.attn.wq_b.weight", 127)
        fp8(f"{p}.attn.wq_b", (heads * head_dim, q_lora), edges)
        fp8(f"{p}.attn.wkv", (head_dim, H))
        b.norm(f"{p}.attn.kv_norm.weight", head_dim)
        fp8(f"{p}.attn.wo_a", (o_groups * o_lora, heads * head_dim // o_groups))
        fp8(f"{p}.attn.wo_b", (H, o_groups * o_lora))
        if ratio:
            coff = 2 if ratio == 4 else 1
            b.plain(f"{p}.attn.compressor.ape", (ratio, coff * head_dim), "F32")
            b.plain(f"{p}.attn.compressor.wkv.weight", (coff * head_dim, H))
            b.plain(f"{p}.attn.compressor.wgate.weight", (coff * head_dim, H))
            b.norm(f"{p}.attn.compressor.norm.weight", head_dim)
        if ratio == 4:
            fp8(f"{p}.attn.indexer.wq_b", (index_heads * index_head_dim, q_lora))
            b.plain(f"{p}.attn.indexer.weights_proj.weight", (index_heads, H))
            b.plain(f"{p}.attn.indexer.compressor.ape", (ratio, 2 * index_head_dim), "F32")
            b.plain(f"{p}.attn.indexer.compressor.wkv.weight", (2 * index_head_dim, H))
            b.plain(f"{p}.attn.indexer.compressor.wgate.weight", (2 * index_head_dim, H))
            b.norm(f"{p}.attn.indexer.compressor.norm.weight", index_head_dim)
        b.plain(f"{p}.ffn.gate.weight", (experts, H))
        if hashed:
            b.plain(f"{p}.ffn.gate.tid2eid", (vocab, topk), "I64", high=experts)
        else:
            b.plain(f"{p}.ffn.gate.bias", (experts,), "F32")
        for e in range(experts):
            x = f"{p}.ffn.experts.{e}"
            names = [(f"{x}.{w}.weight", f"{x}.{w}.weight", f"{x}.{w}.scale") for w in ("w1", "w2", "w3")]
            plant = frozenset()
            if index == 1 and e == 0:
                plant = frozenset({"zero_block", "neg_zero"})
            if index == 1 and e == 1:
                plant = frozenset({"out_of_range"})
            b.mx_experts(names, [(inter, H), (H, inter), (inter, H)], "I8", "F8_E8M0",
                         dead=index == layers - 1 and e == experts - 1, plant=plant)
        for w, shape in (("w1", (inter, H)), ("w2", (H, inter)), ("w3", (inter, H))):
            fp8(f"{p}.ffn.shared_experts.{w}", shape)

    b.plain("embed.weight", (vocab, H))
    for L in range(layers):
        block(f"layers.{L}", compress_ratios[L], L < hash_layers, L)
    for k in range(mtp):
        p = f"mtp.{k}"
        fp8(f"{p}.e_proj", (H, H))
        fp8(f"{p}.h_proj", (H, H))
        b.norm(f"{p}.enorm.weight", H)
        b.norm(f"{p}.hnorm.weight", H)
        block(p, compress_ratios[layers + k], False, layers + k)
        b.norm(f"{p}.norm.weight", H)
        b.plain(f"{p}.hc_head_fn", (hc, hc * H), "F32")
        b.plain(f"{p}.hc_head_base", (hc,), "F32")
        b.plain(f"{p}.hc_head_scale", (1,), "F32")
    b.norm("norm.weight", H)
    b.plain("head.weight", (vocab, H))
    b.plain("hc_head_fn", (hc, hc * H), "F32")
    b.plain("hc_head_base", (hc,), "F32")
    b.plain("hc_head_scale", (1,), "F32")
    cfg = {
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16",
        "vocab_size": vocab, "hidden_size": H, "num_hidden_layers": layers, "num_hash_layers": hash_layers,
        "num_attention_heads": heads, "num_key_value_heads": 1, "head_dim": head_dim, "qk_rope_head_dim": rope,
        "q_lora_rank": q_lora, "o_lora_rank": o_lora, "o_groups": o_groups, "n_routed_experts": experts,
        "n_shared_experts": 1, "num_experts_per_tok": topk, "moe_intermediate_size": inter,
        "scoring_func": "sqrtsoftplus", "routed_scaling_factor": 1.5, "norm_topk_prob": True, "swiglu_limit": 10.0,
        "compress_ratios": list(compress_ratios), "compress_rope_theta": 160000.0, "sliding_window": 128,
        "hc_mult": hc, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "index_n_heads": index_heads,
        "index_head_dim": index_head_dim, "index_topk": 16, "num_nextn_predict_layers": mtp, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "expert_dtype": "fp4",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    }
    return b.fixture(cfg)


# ---------------------------------------------------------------------------------------------
# Kimi-K3

KIMI_K3_QUANTIZATION = {  # compressed-tensors mxfp4-pack-quantized, as Kimi-K3's config.json spells it
    "config_groups": {"group_0": {
        "format": "mxfp4-pack-quantized", "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "scale_dtype": "torch.uint8", "strategy": "group",
                    "symmetric": True, "type": "float", "zp_dtype": None}}},
    "format": "mxfp4-pack-quantized", "global_compression_ratio": None,
    "ignore": ["re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*", "re:.*lm_head.*",
               "re:.*vision_tower.*", "re:.*mm_projector.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}


def kimi_k3(hidden=256, layers=4, experts=4, latent=128, inter=64, dense_inter=512, shared=2, vocab=256,
            kda_heads=2, kda_dim=32, heads=2, q_lora=64, kv_lora=32, rope=16, nope=32, v_dim=32, full_attn=(4,),
            vision=32, seed=2) -> SourceFixture:
    """Kimi-K3 (LAYOUTS.md "Kimi-K3": routed experts compressed-tensors MXFP4, `.weight_packed` U8 [out, in/2]
    + `.weight_scale` U8 E8M0 [out, in/32]; everything else BF16 or F32), with the names of its released
    checkpoint: a `language_model.` wrapper, KDA linear-attention layers and MLA layers at
    `full_attn` (1-based, as config linear_attn_config), layer 0 dense, then `block_sparse_moe` with
    latent experts (w1/w3 [inter, latent], w2 [latent, inter]; `routed_expert_up_proj` /
    `routed_expert_down_proj` map hidden <-> latent in BF16), shared experts, router with
    e_score_correction_bias, and a small vision tower and projector (one 3-D and one 4-D tensor among
    them). The quantization_config sits in text_config, as there. Dead expert scale bytes are 0, as
    compressed-tensors writes for zero blocks."""
    b = _Builder(seed)
    H, lm = hidden, "language_model.model"
    b.plain(f"{lm}.embed_tokens.weight", (vocab, H))
    for L in range(layers):
        p = f"{lm}.layers.{L}"
        b.norm(f"{p}.input_layernorm.weight", H)
        if L + 1 in full_attn:  # MLA
            b.plain(f"{p}.self_attn.q_a_proj.weight", (q_lora, H))
            b.norm(f"{p}.self_attn.q_a_layernorm.weight", q_lora)
            b.plain(f"{p}.self_attn.q_b_proj.weight", (heads * (nope + rope), q_lora))
            b.plain(f"{p}.self_attn.kv_a_proj_with_mqa.weight", (kv_lora + rope, H))
            b.norm(f"{p}.self_attn.kv_a_layernorm.weight", kv_lora)
            b.plain(f"{p}.self_attn.kv_b_proj.weight", (heads * (nope + v_dim), kv_lora))
            width = heads * v_dim
        else:  # KDA
            width = kda_heads * kda_dim
            for x in ("q", "k", "v"):
                b.plain(f"{p}.self_attn.{x}_proj.weight", (width, H))
                b.plain(f"{p}.self_attn.{x}_conv1d.weight", (width, 1, 4), "F32")
            b.plain(f"{p}.self_attn.f_a_proj.weight", (kda_dim, H))
            b.plain(f"{p}.self_attn.f_b_proj.weight", (width, kda_dim))
            b.plain(f"{p}.self_attn.A_log", (kda_heads,), "F32")
            b.plain(f"{p}.self_attn.dt_bias", (width,), "F32")
            b.plain(f"{p}.self_attn.b_proj.weight", (kda_heads, H))
            b.plain(f"{p}.self_attn.o_norm.weight", (kda_dim,), "F32")
        b.plain(f"{p}.self_attn.g_proj.weight", (width, H))
        b.plain(f"{p}.self_attn.o_proj.weight", (H, width))
        b.norm(f"{p}.post_attention_layernorm.weight", H)
        for r in ("self_attention_res", "mlp_res"):
            b.norm(f"{p}.{r}_norm.weight", H)
            b.plain(f"{p}.{r}_proj.weight", (1, H))
        if L == 0:
            b.plain(f"{p}.mlp.gate_proj.weight", (dense_inter, H))
            b.plain(f"{p}.mlp.up_proj.weight", (dense_inter, H))
            b.plain(f"{p}.mlp.down_proj.weight", (H, dense_inter))
            continue
        m = f"{p}.block_sparse_moe"
        for e in range(experts):
            x = f"{m}.experts.{e}"
            names = [(f"{x}.{w}.weight", f"{x}.{w}.weight_packed", f"{x}.{w}.weight_scale") for w in ("w1", "w2", "w3")]
            plant = frozenset()
            if L == 1 and e == 0:
                plant = frozenset({"zero_block", "neg_zero"})
            if L == 2 and e == 1:
                plant = frozenset({"out_of_range"})
            b.mx_experts(names, [(inter, latent), (latent, inter), (inter, latent)], "U8", "U8",
                         dead=L == layers - 1 and e == experts - 1, dead_byte=0, plant=plant)
        b.plain(f"{m}.gate.weight", (experts, H))
        b.plain(f"{m}.gate.e_score_correction_bias", (experts,), "F32")
        b.plain(f"{m}.routed_expert_down_proj.weight", (latent, H))
        b.norm(f"{m}.routed_expert_norm.weight", latent)
        b.plain(f"{m}.routed_expert_up_proj.weight", (H, latent))
        b.plain(f"{m}.shared_experts.gate_proj.weight", (shared * inter, H))
        b.plain(f"{m}.shared_experts.up_proj.weight", (shared * inter, H))
        b.plain(f"{m}.shared_experts.down_proj.weight", (H, shared * inter))
    b.norm(f"{lm}.norm.weight", H)
    b.norm(f"{lm}.output_attn_res_norm.weight", H)
    b.plain(f"{lm}.output_attn_res_proj.weight", (1, H))
    b.plain("language_model.lm_head.weight", (vocab, H))
    V, M = vision, 4 * vision  # merge 2x2
    b.norm("mm_projector.post_norm.weight", H)
    b.plain("mm_projector.proj.0.weight", (M, M))
    b.plain("mm_projector.proj.2.weight", (H, M))
    vt = "vision_tower"
    b.plain(f"{vt}.encoder.blocks.0.mlp.fc0.weight", (4 * V, V))
    b.plain(f"{vt}.encoder.blocks.0.mlp.fc1.weight", (V, 4 * V))
    b.norm(f"{vt}.encoder.blocks.0.norm0.weight", V)
    b.norm(f"{vt}.encoder.blocks.0.norm1.weight", V)
    b.plain(f"{vt}.encoder.blocks.0.wo.weight", (V, 3 * V // 2))
    b.plain(f"{vt}.encoder.blocks.0.wqkv.weight", (9 * V // 2, V))
    b.norm(f"{vt}.encoder.final_layernorm.weight", V)
    b.plain(f"{vt}.patch_embed.pos_emb.weight", (4, 4, V))
    b.plain(f"{vt}.patch_embed.proj.weight", (V, 3, 14, 14))
    kda = [i for i in range(1, layers + 1) if i not in full_attn]
    text = {
        "architectures": ["KimiLinearForCausalLM"], "model_type": "kimi_linear", "dtype": "bfloat16",
        "vocab_size": vocab, "hidden_size": H, "num_hidden_layers": layers, "first_k_dense_replace": 1,
        "moe_layer_freq": 1, "num_experts": experts, "num_experts_per_token": 2, "num_shared_experts": shared,
        "moe_intermediate_size": inter, "routed_expert_hidden_size": latent, "intermediate_size": dense_inter,
        "latent_moe_use_norm": True, "moe_renormalize": True, "moe_router_activation_func": "sigmoid",
        "num_expert_group": 1, "topk_group": 1, "topk_method": "noaux_tc", "use_grouped_topk": True,
        "routed_scaling_factor": 1.0, "hidden_act": "situ", "activation_situ_beta": 4.0,
        "activation_situ_linear_beta": 25.0, "attn_res_block_size": 12, "rms_norm_eps": 1e-5,
        "num_attention_heads": heads, "num_key_value_heads": heads, "q_lora_rank": q_lora, "kv_lora_rank": kv_lora,
        "qk_nope_head_dim": nope, "qk_rope_head_dim": rope, "v_head_dim": v_dim, "mla_use_nope": True,
        "mla_use_output_gate": True, "num_nextn_predict_layers": 0, "tie_word_embeddings": False,
        "linear_attn_config": {"full_attn_layers": list(full_attn), "kda_layers": kda, "gate_lower_bound": -5.0,
                               "head_dim": kda_dim, "num_heads": kda_heads, "short_conv_kernel_size": 4,
                               "use_full_rank_gate": True},
        "quantization_config": KIMI_K3_QUANTIZATION,
    }
    cfg = {
        "architectures": ["KimiK3ForConditionalGeneration"], "model_type": "kimi_k3", "dtype": "bfloat16",
        "text_config": text, "tie_word_embeddings": False,
        "vision_config": {"vt_hidden_size": V, "vt_intermediate_size": 4 * V, "vt_num_hidden_layers": 1,
                          "qkv_hidden_size": 3 * V // 2, "mm_hidden_size": V, "text_hidden_size": H, "patch_size": 14,
                          "merge_kernel_size": [2, 2]},
    }
    return b.fixture(cfg)


# ---------------------------------------------------------------------------------------------
# gpt-oss


def gpt_oss(hidden=128, layers=2, experts=4, inter=64, vocab=256, heads=4, kv_heads=2, head_dim=32,
            seed=3, bf16: bool = False) -> SourceFixture:
    """gpt-oss (LAYOUTS.md "gpt-oss"): fused 3-D MXFP4 experts `mlp.experts.gate_up_proj_blocks` U8
    [E, 2I, H/32, 16] + `_scales` U8 [E, 2I, H/32] + `_bias` BF16 [E, 2I] (gate = even rows, up = odd
    rows), `down_proj_blocks` [E, H, I/32, 16] + `_scales` + `_bias` [E, H]; router weight and bias;
    attention with biases and `self_attn.sinks`, all BF16. reference[...gate_up_proj] is [E, 2I, H]
    (the rows as stored, interleaved). With `bf16`, the experts as a dequantized copy holds them: the
    model's own parameters `gate_up_proj` BF16 [E, H, 2I] and `down_proj` [E, I, H] ([E, in, out],
    docs/formats.md "gpt-oss layout"), gate/up columns still interleaved, no quantization_config."""
    b = _Builder(seed)
    H, I2 = hidden, 2 * inter
    b.plain("model.embed_tokens.weight", (vocab, H))
    for L in range(layers):
        p = f"model.layers.{L}"
        b.norm(f"{p}.input_layernorm.weight", H)
        for x, rows in (("q", heads * head_dim), ("k", kv_heads * head_dim), ("v", kv_heads * head_dim)):
            b.plain(f"{p}.self_attn.{x}_proj.weight", (rows, H))
            b.plain(f"{p}.self_attn.{x}_proj.bias", (rows,))
        b.plain(f"{p}.self_attn.o_proj.weight", (H, heads * head_dim))
        b.plain(f"{p}.self_attn.o_proj.bias", (H,))
        b.plain(f"{p}.self_attn.sinks", (heads,))
        b.norm(f"{p}.post_attention_layernorm.weight", H)
        b.plain(f"{p}.mlp.router.weight", (experts, H))
        b.plain(f"{p}.mlp.router.bias", (experts,))
        x = f"{p}.mlp.experts"
        if bf16:
            _plain_3d(b, f"{x}.gate_up_proj", (experts, H, I2), IN_OUT, INTERLEAVED, L == layers - 1)
            b.plain(f"{x}.gate_up_proj_bias", (experts, I2))
            _plain_3d(b, f"{x}.down_proj", (experts, inter, H), IN_OUT, None, L == layers - 1)
            b.plain(f"{x}.down_proj_bias", (experts, H))
            continue
        gu = [b.mx((I2, H)) for _ in range(experts)]
        dn = [b.mx((H, inter)) for _ in range(experts)]
        if L == 0:  # expert 0: a zero block and a -0.0; expert 1: a gate block out of range
            gu[0][0][2, 16:32] = 0
            b.plant("zero_block", (f"{x}.gate_up_proj", 0, 2, 1))
            gu[0][0][3, 0] = (gu[0][0][3, 0] & 0xF0) | 0x08
            b.plant("neg_zero", (f"{x}.gate_up_proj", 0, 3, 0))
            g, u = (gu[1][0][0::2], gu[1][1][0::2]), (gu[1][0][1::2], gu[1][1][1::2])
            top = int(max(g[1].max(), u[1].max()))
            rows, blocks = np.nonzero(g[1] < top)
            r, c = int(rows[-1]), int(blocks[-1])
            gu[1][1][2 * r, c] = top - OUT_OF_RANGE_BINADES  # gate row r is stored row 2r
            gu[1][0][2 * r, c * 16:(c + 1) * 16] |= 0x11
            b.plant("out_of_range", (f"{x}.gate_up_proj", 1, 2 * r, c))
        if L == layers - 1:
            for packed, e8m0 in (gu[-1], dn[-1]):
                packed[:] = 0
                e8m0[:] = 0
            b.plant("dead_expert", (f"{x}.gate_up_proj", experts - 1))
        for name, enc, rows, cols in (("gate_up_proj", gu, I2, H), ("down_proj", dn, H, inter)):
            blocks = np.stack([pk.reshape(rows, cols // _MX, 16) for pk, _ in enc])
            scales = np.stack([s for _, s in enc])
            b._add(f"{x}.{name}_blocks", "U8", blocks)
            b._add(f"{x}.{name}_scales", "U8", scales)
            b.reference[f"{x}.{name}"] = np.stack([mx_reference(pk, s) for pk, s in enc])
            b.expected[f"{x}.{name}"] = Expected(MXFP4_3D, (f"{x}.{name}_blocks",), (f"{x}.{name}_scales",),
                                                 (rows, cols), experts, OUT_IN,
                                                 INTERLEAVED if name == "gate_up_proj" else None)
            b.plain(f"{x}.{name}_bias", (experts, rows))
    b.norm("model.norm.weight", H)
    b.plain("lm_head.weight", (vocab, H))
    cfg = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "torch_dtype": "bfloat16",
        "hidden_size": H, "intermediate_size": inter, "num_hidden_layers": layers, "num_local_experts": experts,
        "num_experts_per_tok": 2, "experts_per_token": 2, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": head_dim, "vocab_size": vocab, "attention_bias": True, "sliding_window": 128,
        "layer_types": ["sliding_attention" if L % 2 == 0 else "full_attention" for L in range(layers)],
        "swiglu_limit": 7.0, "rope_theta": 150000, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "hidden_act": "silu",
        "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"],
                                "quant_method": "mxfp4"},
    }
    if bf16:
        del cfg["quantization_config"]
    return b.fixture(cfg)


def gpt_oss_bf16(**kw) -> SourceFixture:
    """gpt-oss with its experts dequantized to BF16 (gpt_oss(bf16=True))."""
    return gpt_oss(bf16=True, **kw)


# ---------------------------------------------------------------------------------------------
# Fused 3-D float experts


def _plain_3d(b: _Builder, name: str, stored: tuple[int, int, int], orientation: str, gate_up: str | None,
              dead: bool) -> None:
    raw = _bf16(b.normal(stored))
    raw[0, 1, 2] = 0x8000  # -0.0; planted locations are logical [out, in], as the reference
    b.plant("neg_zero", (name, 0, 1, 2) if orientation == OUT_IN else (name, 0, 2, 1))
    if dead:
        raw[-1] = 0
        b.plant("dead_expert", (name, stored[0] - 1))
    b._add(name, "BF16", raw)
    values = _float_values(raw, "BF16")
    ref = values if orientation == OUT_IN else values.transpose(0, 2, 1)
    b.reference[name] = np.ascontiguousarray(ref)
    b.expected[name] = Expected(PLAIN_3D, (name,), (), tuple(ref.shape[1:]), stored[0], orientation, gate_up)


def llama4(hidden=64, layers=2, experts=4, inter=48, inter_mlp=128, vocab=256, heads=4, kv_heads=2, head_dim=16,
           moe_step=1, vision=32, seed=4) -> SourceFixture:
    """Llama 4 (LAYOUTS.md "Llama 4"): `language_model.model.layers.{L}.feed_forward.experts.gate_up_proj`
    BF16 [E, in, 2I] and `down_proj` [E, in, out] (= [E, I, H]), `feed_forward.router.weight` [E, H],
    `feed_forward.shared_expert.{gate,up,down}_proj.weight`; dense `feed_forward.{gate,up,down}_proj`
    between MoE layers when moe_step > 1 (Maverick); `vision_model.*` and `multi_modal_projector.*`.
    hidden != 2 x inter, so the two orientations cannot be confused by shape."""
    b = _Builder(seed)
    H, lm = hidden, "language_model.model"
    b.plain(f"{lm}.embed_tokens.weight", (vocab, H))
    for L in range(layers):
        p = f"{lm}.layers.{L}"
        b.norm(f"{p}.input_layernorm.weight", H)
        b.plain(f"{p}.self_attn.q_proj.weight", (heads * head_dim, H))
        b.plain(f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, H))
        b.plain(f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, H))
        b.plain(f"{p}.self_attn.o_proj.weight", (H, heads * head_dim))
        b.norm(f"{p}.post_attention_layernorm.weight", H)
        f = f"{p}.feed_forward"
        if (L + 1) % moe_step:
            b.plain(f"{f}.gate_proj.weight", (inter_mlp, H))
            b.plain(f"{f}.up_proj.weight", (inter_mlp, H))
            b.plain(f"{f}.down_proj.weight", (H, inter_mlp))
            continue
        b.plain(f"{f}.router.weight", (experts, H))
        _plain_3d(b, f"{f}.experts.gate_up_proj", (experts, H, 2 * inter), IN_OUT, HALVES, L == layers - 1)
        _plain_3d(b, f"{f}.experts.down_proj", (experts, inter, H), IN_OUT, None, L == layers - 1)
        b.plain(f"{f}.shared_expert.gate_proj.weight", (inter, H))
        b.plain(f"{f}.shared_expert.up_proj.weight", (inter, H))
        b.plain(f"{f}.shared_expert.down_proj.weight", (H, inter))
    b.norm(f"{lm}.norm.weight", H)
    b.plain("language_model.lm_head.weight", (vocab, H))
    V = vision
    b.plain("vision_model.class_embedding", (V,))
    b.plain("vision_model.patch_embedding.linear.weight", (V, 3 * 14 * 14))
    b.plain("vision_model.positional_embedding_vlm", (17, V))
    b.plain("vision_model.model.layers.0.self_attn.q_proj.weight", (V, V))
    b.plain("vision_model.model.layers.0.self_attn.q_proj.bias", (V,))
    b.plain("multi_modal_projector.linear_1.weight", (H, V))
    text = {"model_type": "llama4_text", "hidden_size": H, "intermediate_size": inter, "intermediate_size_mlp": inter_mlp,
            "num_hidden_layers": layers, "num_local_experts": experts, "num_experts_per_tok": 1,
            "interleave_moe_layer_step": moe_step, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": head_dim, "vocab_size": vocab, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
            "torch_dtype": "bfloat16"}
    cfg = {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4", "torch_dtype": "bfloat16",
           "text_config": text, "vision_config": {"model_type": "llama4_vision_model", "hidden_size": V,
                                                  "num_hidden_layers": 1, "patch_size": 14}}
    return b.fixture(cfg)


def fused_experts(hidden=64, layers=2, experts=4, inter=48, vocab=256, heads=4, kv_heads=2, head_dim=16,
                  seed=5) -> SourceFixture:
    """The transformers-5 fused layout (LAYOUTS.md "transformers-5 style fused experts") on Qwen3-MoE's
    names: `model.layers.{L}.mlp.experts.gate_up_proj` BF16 [E, 2I, H] (gate rows then up rows),
    `mlp.experts.down_proj` [E, H, I], shared expert and its `shared_expert_gate` [1, H]."""
    b = _Builder(seed)
    H = hidden
    b.plain("model.embed_tokens.weight", (vocab, H))
    for L in range(layers):
        p = f"model.layers.{L}"
        b.norm(f"{p}.input_layernorm.weight", H)
        b.plain(f"{p}.self_attn.q_proj.weight", (heads * head_dim, H))
        b.plain(f"{p}.self_attn.k_proj.weight", (kv_heads * head_dim, H))
        b.plain(f"{p}.self_attn.v_proj.weight", (kv_heads * head_dim, H))
        b.plain(f"{p}.self_attn.o_proj.weight", (H, heads * head_dim))
        b.norm(f"{p}.self_attn.q_norm.weight", head_dim)
        b.norm(f"{p}.self_attn.k_norm.weight", head_dim)
        b.norm(f"{p}.post_attention_layernorm.weight", H)
        b.plain(f"{p}.mlp.gate.weight", (experts, H))
        _plain_3d(b, f"{p}.mlp.experts.gate_up_proj", (experts, 2 * inter, H), OUT_IN, HALVES, L == layers - 1)
        _plain_3d(b, f"{p}.mlp.experts.down_proj", (experts, H, inter), OUT_IN, None, L == layers - 1)
        b.plain(f"{p}.mlp.shared_expert.gate_proj.weight", (inter, H))
        b.plain(f"{p}.mlp.shared_expert.up_proj.weight", (inter, H))
        b.plain(f"{p}.mlp.shared_expert.down_proj.weight", (H, inter))
        b.plain(f"{p}.mlp.shared_expert_gate.weight", (1, H))
    b.norm("model.norm.weight", H)
    b.plain("lm_head.weight", (vocab, H))
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": H,
           "num_hidden_layers": layers, "num_experts": experts, "num_experts_per_tok": 2, "moe_intermediate_size": inter,
           "shared_expert_intermediate_size": inter, "vocab_size": vocab, "num_attention_heads": heads,
           "num_key_value_heads": kv_heads, "head_dim": head_dim, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    return b.fixture(cfg)


# Every builder, by the name tests parametrize over.
SOURCES = {
    "deepseek_v3": deepseek_v3_fp8,
    "deepseek_v4": deepseek_v4,
    "kimi_k3": kimi_k3,
    "gpt_oss": gpt_oss,
    "gpt_oss_bf16": gpt_oss_bf16,
    "llama4": llama4,
    "fused_experts": fused_experts,
}
