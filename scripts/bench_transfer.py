"""Benchmark the transfer stage on a real pair: cost per adapter and training-free quality, in one run.

For each alignment given (e.g. with and without --per-layer-transfer) it runs `loramigrate transfer`
as a subprocess (wall time and peak RSS from its manifest, with and without the PEFT reload check),
then evaluates on the task data, side by side: old base alone, old base + old adapter, new base alone,
new base + each transferred adapter; and the fraction of the old adapter's gain that transfer keeps.

Run:
  python scripts/bench_transfer.py --old-base ~/.cache/loramigrate/models/qwen2.5-coder-0.5b \
      --new-base ~/.cache/loramigrate/models/qwen2.5-coder-1.5b --adapter runs/adapters/qwen05-arith3 \
      --align runs/qwen/align --align runs/qwen/align-perlayer \
      --data ~/.cache/loramigrate/data/arith3/test.jsonl --limit 100
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

from loramigrate.config import ModelLoadConfig
from loramigrate.evaluate import evaluate_pairs, read_task, with_flips


def transfer(align: str, adapter: str, out: Path, verify: bool) -> dict:
    cmd = ["loramigrate", "-q", "transfer", "--align", align, "--adapter", adapter, "-o", str(out)]
    subprocess.run([*cmd, "--verify" if verify else "--no-verify"], check=True)
    m = json.loads((out / "manifest.json").read_text())
    return {"wall_s": m["wall_s"], "peak_rss_mb": m["peak_rss_mb"], "verify": verify}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old-base", required=True)
    ap.add_argument("--new-base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--align", action="append", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    report: dict = {"date": str(date.today()), "command": " ".join(sys.argv),
                    "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"}
    outs, report["transfer"] = [], []
    root = Path(tempfile.mkdtemp())
    for k, align in enumerate(args.align):
        out = root / f"transfer{k}"
        quick = transfer(align, args.adapter, root / f"quick{k}", verify=False)
        full = transfer(align, args.adapter, out, verify=True)
        report["transfer"].append({"align": align, "no_verify": quick, "with_verify": full})
        outs.append(str(out))
    print(json.dumps(report, indent=1), flush=True)
    task = read_task(args.data, args.limit)
    load = ModelLoadConfig(device="cpu")
    old_rows = evaluate_pairs(args.old_base, [args.adapter], task, args.batch_size, load)
    new_rows = evaluate_pairs(args.new_base, outs, task, args.batch_size, load)
    reference = old_rows[1]
    rows = with_flips(old_rows + new_rows, reference)
    old_gain = old_rows[1].score - old_rows[0].score
    old_loss_gain = old_rows[0].loss - old_rows[1].loss
    report["eval"] = [r.summary() for r in rows]
    report["recovered"] = [
        {"align": a, "metric_gain_fraction": (r.score - new_rows[0].score) / old_gain if old_gain else None,
         "loss_gain_fraction": (new_rows[0].loss - r.loss) / old_loss_gain if old_loss_gain else None}
        for a, r in zip(args.align, new_rows[1:], strict=True)
    ]
    print(json.dumps({k: report[k] for k in ("eval", "recovered")}, indent=1), flush=True)


if __name__ == "__main__":
    main()
