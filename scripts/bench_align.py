"""Benchmark the align stage on a real pair, side by side with its baselines, in one run.

Measures (results go to BENCHMARKS.md):
  1. align compute time ÷ the time of two plain forward passes (old + new) over the same calibration
     batches, both with the models already loaded (goal ≤ 1.3×);
  2. peak RSS of a whole `loramigrate align` process at 1×, 2×, 4×, 8× calibration tokens, next to a
     process that only loads the two models (goal: flat beyond the models);
  3. head-matching time for every mapped layer of the pair, and for a synthetic grid of 32 layers ×
     32 heads × hidden 4096 (head_dim 128) with a random orthogonal transfer matrix (goal < 60 s),
     exact and with the hidden dimension sketched to 512 / 256 (and how often the sketched head map
     agrees with the exact one on the real pair).

Run:
  python scripts/bench_align.py --old ~/.cache/loramigrate/models/qwen2.5-coder-0.5b \
      --new ~/.cache/loramigrate/models/qwen2.5-coder-1.5b --tokens 512
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment

from loramigrate.align.activations import calibration_batches, read_calibration, residual_streams
from loramigrate.align.core import align_models
from loramigrate.align.head_match import assign_hungarian, head_similarity
from loramigrate.arch import LayerWeights, layer_weights
from loramigrate.config import AlignConfig
from loramigrate.models import load_model, load_tokenizer, resolve_model

MODELS_ONLY = """
import resource, sys
from loramigrate.models import load_model, resolve_model
a = load_model(resolve_model(sys.argv[1])); b = load_model(resolve_model(sys.argv[2]))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def compute_ratio(cfg: AlignConfig) -> dict:
    old_ref, new_ref = resolve_model(cfg.old), resolve_model(cfg.new)
    old_tok, new_tok = load_tokenizer(old_ref), load_tokenizer(new_ref)
    old, new = load_model(old_ref), load_model(new_ref)
    texts = read_calibration(None)
    batches = list(calibration_batches(texts, old_tok, new_tok, cfg.seq_len, cfg.max_tokens, cfg.batch_size))

    def forwards():
        for enc_old, enc_new in batches:
            residual_streams(old, enc_old)
            residual_streams(new, enc_new)

    forwards()  # warm-up: first-call allocations are not the method's cost
    _, t_fwd = timed(forwards)
    alignment, t_align = timed(lambda: align_models(old, new, old_tok, new_tok, texts, cfg))
    mapped = [(j, i) for j, i in enumerate(alignment.layer_map) if i is not None]

    def heads():
        for j, i in mapped:
            sim = head_similarity(layer_weights(old, alignment.old, i), layer_weights(new, alignment.new, j),
                                  alignment.transfer)
            linear_sum_assignment(sim.numpy(), maximize=True)

    _, t_heads = timed(heads)
    agreement = {}
    for size in (256, 512):
        same = total = 0
        for j, i in mapped:
            sketched = assign_hungarian(head_similarity(layer_weights(old, alignment.old, i),
                                                        layer_weights(new, alignment.new, j), alignment.transfer,
                                                        sketch=size))
            same += sum(a == b for a, b in zip(sketched, alignment.layers[j].head_map, strict=True))
            total += len(sketched)
        agreement[size] = same / total
    tokens = sum(int(e["attention_mask"].sum()) for e, _ in batches)
    phases = alignment.info["timings"]
    return {"tokens": tokens, "forward_s": t_fwd, "align_s": t_align, "ratio": t_align / t_fwd,
            "cka_pass_ratio": phases["cka_s"] / t_fwd, "phases_s": phases,
            "heads_s": t_heads, "sketch_head_map_agreement": agreement, "mapped_layers": len(mapped),
            "estimator": alignment.info["calibration"]["cka_estimator"], "layer_map": alignment.layer_map,
            "head_similarity": alignment.info["scores"]["head_similarity"]}


def rss_scaling(cfg: AlignConfig, multiples: list[int]) -> list[dict]:
    rows = []
    models_only = float(subprocess.run([sys.executable, "-c", MODELS_ONLY, cfg.old, cfg.new],
                                       capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    rows.append({"tokens": 0, "peak_rss_mb": models_only, "wall_s": None, "what": "load both models only"})
    calib = Path(tempfile.mkdtemp()) / "calib.txt"
    calib.write_text("\n\n".join(read_calibration(None) * 64))  # enough text for the largest multiple
    for k in multiples:
        out = Path(tempfile.mkdtemp()) / "align"
        subprocess.run(["loramigrate", "-q", "align", "--old", cfg.old, "--new", cfg.new, "--calib", str(calib),
                        "--max-tokens", str(cfg.max_tokens * k), "--cka", "minibatch", "-o", str(out)], check=True)
        m = json.loads((out / "manifest.json").read_text())
        a = json.loads((out / "alignment.json").read_text())
        rows.append({"tokens": a["calibration"]["rows"], "peak_rss_mb": m["peak_rss_mb"], "wall_s": m["wall_s"],
                     "what": f"align, {k}× tokens"})
    return rows


def synthetic_grid(layers: int = 32, heads: int = 32, hidden: int = 4096, head_dim: int = 128,
                   sketch: int | None = None) -> dict:
    g = torch.Generator().manual_seed(0)

    def weights() -> LayerWeights:
        def w(*shape):
            return torch.randn(*shape, generator=g) * 0.02
        return LayerWeights(q=w(heads, head_dim, hidden), k=w(heads, head_dim, hidden), v=w(heads, head_dim, hidden),
                            o=w(heads, head_dim, hidden), up=torch.empty(0), down=torch.empty(0))

    old, new = weights(), weights()
    t = torch.linalg.qr(torch.randn(hidden, hidden, generator=g))[0]
    start = time.perf_counter()
    for _ in range(layers):
        sim = head_similarity(old, new, t, sketch=sketch)
        linear_sum_assignment(sim.numpy(), maximize=True)
    total = time.perf_counter() - start
    return {"layers": layers, "heads": heads, "hidden": hidden, "sketch": sketch, "total_s": total,
            "per_layer_s": total / layers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True)
    ap.add_argument("--new", required=True)
    ap.add_argument("--tokens", type=int, default=512, help="calibration tokens of the 1× run")
    ap.add_argument("--multiples", default="1,2,4,8")
    ap.add_argument("--grid-layers", type=int, default=32)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = AlignConfig(old=args.old, new=args.new, max_tokens=args.tokens, cka="minibatch")
    report = {"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads, torch {torch.__version__}", "command": " ".join(sys.argv)}
    report["ratio"] = compute_ratio(cfg)
    print(json.dumps(report, indent=1), flush=True)
    report["rss"] = rss_scaling(cfg, [int(x) for x in args.multiples.split(",")])
    print(json.dumps(report["rss"], indent=1), flush=True)
    report["grid"] = [synthetic_grid(layers=args.grid_layers, sketch=k) for k in (None, 512, 256)]
    print(json.dumps(report["grid"], indent=1), flush=True)


if __name__ == "__main__":
    main()
