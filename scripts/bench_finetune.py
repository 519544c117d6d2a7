"""Benchmark the finetune stage on a real pair, all arms in one run: how fast does a migrated adapter
get ready, compared with retraining?

Arms (each a `loramigrate` subprocess, so every manifest has its own wall time and peak RSS):
  old       a fresh LoRA on the OLD base (the adapter being migrated; not timed against the others)
  retrain   a fresh LoRA on the NEW base with the full budget (--retrain-steps, all training data)
  scratch   a fresh LoRA on the NEW base, 100 training examples, the migrated budget
  migrated  transfer of `old` + finetune (--steps), plain / + scheduled regularisation / + RefLoRA /
            + both
Then every final adapter is evaluated on the test split, with negative flips against old base + old
adapter. Reported: the time-to-readiness ratio (retrain's time to its final validation metric ÷ the
migrated arm's transfer + finetune time to reach that metric), final quality, the s/step of each
finetune arm against the plain one (overheads of the regulariser and of RefLoRA), peak RSS.

Run (MiniLM-L3 → L6 on multiemo, about 25 minutes on 2 CPU cores):
  python scripts/bench_finetune.py --old-base ~/.cache/loramigrate/models/minilm-l3 \
      --new-base ~/.cache/loramigrate/models/minilm-l6 --data ~/.cache/loramigrate/data/multiemo \
      --work /tmp/bench-ft
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date

import torch
from benchlib import add_common_args, baselines, curve, first_reaching, manifest, plot_curves, sh, step_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    args = ap.parse_args()
    w = args.work
    common = baselines(args)
    train, val, test = (args.data / f"{s}.jsonl" for s in ("train", "val", "test"))
    from loramigrate.evaluate import METRIC, read_task

    metric = METRIC[read_task(val, 1).kind]
    variants = {"migrated": [], "migrated+reg": ["--reg-lambda", "1.0", "--reg-final", "0.01"],
                "migrated+refLoRA": ["--rebalance", "scalar"],
                "migrated+reg+refLoRA": ["--reg-lambda", "1.0", "--reg-final", "0.01", "--rebalance", "scalar"]}
    for name, extra in variants.items():
        sh("finetune", "--base", args.new_base, "--init", w / "transfer", "--data", train, "--steps", args.steps,
           *common, *extra, "-o", w / name)

    sh("eval", "--base", args.old_base, "--adapter", w / "old", "--data", test, "--limit", args.test_limit,
       "--json", w / "eval-old.json")
    arms = ["transfer", "retrain", "scratch", *variants]
    sh("eval", "--base", args.new_base, *[x for a in arms for x in ("--adapter", w / a)], "--data", test,
       "--limit", args.test_limit, "--reference-base", args.old_base, "--reference-adapter", w / "old",
       "--json", w / "eval-new.json")

    tests = {r["name"].split(" + ")[-1]: r for r in json.loads((w / "eval-new.json").read_text())["results"]}
    old_test = json.loads((w / "eval-old.json").read_text())["results"][-1]
    retrain_curve = curve(w / "retrain", metric)
    ready_value = retrain_curve[-1][1]
    retrain_ready = first_reaching(retrain_curve, ready_value)
    retrain_ready_step = first_reaching(curve(w / "retrain", metric, "step"), ready_value)
    transfer_s = manifest(w / "transfer")["wall_s"]
    plain_step = step_seconds(w / "migrated")
    print(f"\n## finetune benchmark ({date.today()}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads)\n")
    print(f"retrain reaches its final val {metric} {ready_value:.3f} at {retrain_ready:.0f} s "
          f"(of {retrain_curve[-1][0]:.0f} s); transfer took {transfer_s:.1f} s; align "
          f"{manifest(w / 'align')['wall_s']:.1f} s (once per base pair, not counted)\n")
    print(f"retrain reaches it at step {retrain_ready_step}. Step ratio = retrain's steps to its final ÷ the arm's "
          "steps to the same value (same model and batch, so free of machine noise); best = the arm's best val.\n")
    print(f"| arm | steps | final val {metric} | best val | test {metric} | test loss | neg. flips vs old | time to "
          f"retrain's final (s) | ratio | step ratio | s/step | vs plain | peak RSS (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    old_curve = curve(w / "old", metric)
    print(f"| old base + old adapter | {args.retrain_steps} | {old_curve[-1][1]:.3f} | {max(v for _, v in old_curve):.3f} | "
          f"{old_test[metric]:.3f} | {old_test['loss']:.3f} | – | – | – | – | {step_seconds(w / 'old'):.2f} | – | "
          f"{manifest(w / 'old')['peak_rss_mb']:.0f} |")
    t = tests["transfer"]
    print(f"| transfer only | 0 | – | – | {t[metric]:.3f} | {t['loss']:.3f} | {t.get('negative_flips', '–')} | "
          f"– | – | – | – | – | {manifest(w / 'transfer')['peak_rss_mb']:.0f} |")
    plots = {}
    for arm in ["retrain", "scratch", *variants]:
        pts = curve(w / arm, metric)
        offset = transfer_s if arm.startswith("migrated") else 0.0
        plots[arm] = [(s + offset, v) for s, v in pts]
        reach = first_reaching(plots[arm], ready_value)
        ratio = f"{retrain_ready / reach:.1f}×" if reach else "not reached"
        reach_step = first_reaching(curve(w / arm, metric, "step"), ready_value)
        step_ratio = f"{retrain_ready_step / reach_step:.1f}×" if reach_step else "not reached"
        sps = step_seconds(w / arm)
        r = tests[arm]
        print(f"| {arm} | {len((w / arm / 'log.jsonl').read_text().splitlines())} | "
              f"{pts[-1][1]:.3f} | {max(v for _, v in pts):.3f} | {r[metric]:.3f} | {r['loss']:.3f} | "
              f"{r.get('negative_flips', '–')} | {'–' if reach is None else round(reach, 1)} | {ratio} | {step_ratio} | "
              f"{sps:.2f} | {sps / plain_step:.2f}× | "
              f"{manifest(w / arm)['peak_rss_mb']:.0f} |")
    plot_curves(plots, ready_value, metric, w / "bench_finetune.png", "wall seconds (migrated arms include transfer)")
    print(f"\nplot: {w / 'bench_finetune.png'}")


if __name__ == "__main__":
    main()
