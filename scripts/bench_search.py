"""Benchmark the search stage on a real pair, in one run: what a trial costs against one validation
pass, how much the best blend improves on transfer as is, and what it does downstream (finetune from
the searched init vs from plain transfer, same budget: quality and time to the plain arm's final
metric).

Needs an align directory and a transfer directory of that alignment (e.g. from bench_finetune.py).

Run (MiniLM-L3 → L6 on multiemo):
  python scripts/bench_search.py --align /tmp/bench-ft/align --transfer /tmp/bench-ft/transfer \
      --new-base ~/.cache/loramigrate/models/minilm-l6 --data ~/.cache/loramigrate/data/multiemo \
      --work /tmp/bench-search
  # the multi-fidelity objective (val loss after 5 finetune steps, poor trials pruned):
  python scripts/bench_search.py ... --fidelity-steps 5 --work /tmp/bench-search-mf
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
from benchlib import curve, first_reaching, manifest, sh

from loramigrate.evaluate import METRIC, read_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--align", type=Path, required=True)
    ap.add_argument("--transfer", type=Path, required=True)
    ap.add_argument("--new-base", required=True)
    ap.add_argument("--data", type=Path, required=True, help="folder with train/val/test.jsonl")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--n-trials", type=int, default=30)
    ap.add_argument("--limit", type=int, default=128, help="validation examples per trial")
    ap.add_argument("--space", default="groups")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--finetune-args", default="--batch-size 32 --lr 1e-3 --eval-every 20 --eval-limit 300")
    ap.add_argument("--fidelity-steps", type=int, default=0,
                    help="> 0: the multi-fidelity objective (val loss after this many finetune steps, pruned early)")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    train, val, test = (args.data / f"{s}.jsonl" for s in ("train", "val", "test"))
    # trials score the first --limit rows of a split the finetune validation (first 300 of val) does not use
    search_val = w / "search-val.jsonl"
    search_val.write_text("".join(val.read_text().splitlines(keepends=True)[-args.limit:]))
    fidelity = ["--fidelity-steps", args.fidelity_steps, "--train", train] if args.fidelity_steps else []
    sh("search", "--align", args.align, "--transfer", args.transfer, "--data", search_val, "--limit", args.limit,
       "--n-trials", args.n_trials, "--space", args.space, *fidelity, "-o", w / "search")
    for name, init in (("from-transfer", args.transfer), ("from-search", w / "search")):
        sh("finetune", "--base", args.new_base, "--init", init, "--data", train, "--val", val, "--steps", args.steps,
           *args.finetune_args.split(), "-o", w / name)
    sh("eval", "--base", args.new_base, "--adapter", args.transfer, "--adapter", w / "search", "--adapter",
       w / "from-transfer", "--adapter", w / "from-search", "--data", test, "--limit", 1000, "--json", w / "eval.json")

    metric = METRIC[read_task(val, 1).kind]
    s = manifest(w / "search")
    summary = s["search"]
    tests = {r["name"].split(" + ")[-1]: r for r in json.loads((w / "eval.json").read_text())["results"]}
    plain, searched = curve(w / "from-transfer", metric), curve(w / "from-search", metric)
    target = plain[-1][1]
    reach, plain_reach = first_reaching(searched, target), first_reaching(plain, target)
    print(f"\n## search benchmark ({date.today()}, {platform.machine()}, {torch.get_num_threads()} threads)\n")
    print(f"- {summary['trials']} trials ({summary.get('pruned', 0)} more pruned), {args.space} space, objective: "
          f"{summary.get('objective', 'val loss')} on {args.limit} validation examples; "
          f"stage wall time {s['wall_s']:.0f} s, peak RSS {s['peak_rss_mb']:.0f} MB")
    print(f"- one validation pass {summary['validation_pass_s']:.2f} s; median trial {summary['median_trial_s']:.2f} s "
          f"(×{summary['trial_cost_ratio']:.2f}, sampler included), blend + pass {summary['median_blend_and_pass_s']:.2f} s "
          f"(×{summary['blend_and_pass_ratio']:.2f})")
    print(f"- validation loss: transfer as is {summary['transfer_as_is']:.4f} → best blend {summary['best_value']:.4f} "
          f"(trial {summary['best_trial']})\n")
    print(f"| init | test {metric} before finetune | after {args.steps} steps: val {metric} | test {metric} | test loss | "
          f"time to {target:.3f} val (s) |")
    print("|---|---|---|---|---|---|")
    for name, init, tuned, points, t in (("plain transfer", args.transfer.name, "from-transfer", plain, plain_reach),
                                        ("searched", "search", "from-search", searched, reach)):
        after = tests[tuned]
        print(f"| {name} | {tests[init][metric]:.3f} | {points[-1][1]:.3f} | {after[metric]:.3f} | {after['loss']:.3f} | "
              f"{'not reached' if t is None else round(t, 1)} |")


if __name__ == "__main__":
    main()
