"""The end-to-end benchmark: the whole migration (`loramigrate run`) against retraining, in one run.

Arms: old base + old adapter; new base alone; transfer only; migrated (`loramigrate run` with the
recipe: align → transfer → [search] → finetune); small-scale scratch (100 examples, the migrated
finetune budget); full LoRA retraining on the new base. Reported: test quality and negative flips
(against the old pair), time per stage, peak memory, the time-to-readiness ratio against retraining
(retrain's time to its final val metric ÷ the migrated time to reach it: align + transfer + [search] +
finetune), the same with the alignment shared by 10 adapters, and retrain's time to the migrated arm's
final quality ÷ the migrated time. Plot: metric against wall time for all arms.

Shares --work with bench_finetune.py: arms already finished there (old, align, transfer, retrain,
scratch) are kept, not recomputed.

Run (MiniLM-L3 → L6 on multiemo):
  python scripts/bench_migration.py --old-base ~/.cache/loramigrate/models/minilm-l3 \
      --new-base ~/.cache/loramigrate/models/minilm-l6 --data ~/.cache/loramigrate/data/multiemo \
      --work /tmp/bench-ft --recipe recipes/minilm-l3-to-l6.yaml
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch
from benchlib import add_common_args, baselines, curve, first_reaching, manifest, plot_curves, sh

FLEET = 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--recipe", type=Path, required=True, help="the pair's recipe (stage options)")
    args = ap.parse_args()
    w = args.work
    baselines(args)
    from loramigrate.evaluate import METRIC, read_task

    train, val, test = (args.data / f"{s}.jsonl" for s in ("train", "val", "test"))
    metric = METRIC[read_task(val, 1).kind]
    # the run aligns with the recipe's options into RUN/align (bench_finetune's align/ has its own options)
    sh("run", args.recipe, "--adapter", w / "old", "-o", w / "run",
       "--set", f"old={args.old_base}", "--set", f"new={args.new_base}", "--set", f"data.train={train}",
       "--set", f"data.val={val}", "--set", f"data.test={test}", "--set", f"eval.limit={args.test_limit}",
       "--set", f"finetune.steps={args.steps}")
    run = w / "run" / "old"
    compared = json.loads((run / "eval" / "results.json").read_text())
    results = {r["arm"]: r for r in [compared["reference"], *compared["results"]]}
    sh("eval", "--base", args.new_base, "--adapter", w / "retrain", "--adapter", w / "scratch", "--data", test,
       "--limit", args.test_limit, "--reference-base", args.old_base, "--reference-adapter", w / "old",
       "--json", w / "eval-baselines.json")
    for r in json.loads((w / "eval-baselines.json").read_text())["results"]:
        name = r["name"].split(" + ")[-1]
        if name in ("retrain", "scratch"):
            results[{"retrain": "full retrain", "scratch": "scratch (100 examples)"}[name]] = {**r, "score": r[metric]}

    stages = json.loads((w / "run" / "summary.json").read_text())["adapters"]["old"]["stages"]  # those the recipe runs
    cost = {s["stage"]: manifest(Path(s["dir"])) for s in stages if s["stage"] != "eval"}
    before_ft = sum(m["wall_s"] for stage, m in cost.items() if stage != "finetune")
    shared = before_ft - cost["align"]["wall_s"] * (1 - 1 / FLEET)
    retrain, migrated = curve(w / "retrain", metric), curve(run / "finetune", metric)
    ready = retrain[-1][1]
    retrain_ready = first_reaching(retrain, ready)
    reach = first_reaching(migrated, ready)
    final = migrated[-1][1]
    retrain_to_final = first_reaching(retrain, final)

    def ratio(numerator: float | None, overhead: float, at: float | None) -> str:
        return "not reached" if numerator is None or at is None else f"{numerator / (overhead + at):.1f}×"

    print(f"\n## end-to-end benchmark ({date.today()}, {platform.machine()}, {torch.get_num_threads()} threads)\n")
    print(f"| arm | test {metric} | test loss | negative flips vs old |")
    print("|---|---|---|---|")
    for arm in ("old base + old adapter", "new base alone", "copy (old adapter as is)", "transfer only", "searched init",
                "final (finetuned)", "scratch (100 examples)", "full retrain"):
        r = results.get(arm)
        if r is None:  # a stage the recipe skips
            continue
        if "note" in r:
            print(f"| {arm} | – | – | {r['note']} |")
            continue
        flips = "reference" if arm.startswith("old base") else r.get("negative_flips", "–")
        print(f"| {arm} | {r['score']:.3f} | {r['loss']:.3f} | {flips} |")
    print("\n| stage | wall s | peak RSS MB |\n|---|---|---|")
    for stage, m in cost.items():
        print(f"| {stage} | {m['wall_s']:.1f} | {m['peak_rss_mb']:.0f} |")
    print(f"| full retrain ({args.retrain_steps} steps) | {manifest(w / 'retrain')['wall_s']:.1f} | "
          f"{manifest(w / 'retrain')['peak_rss_mb']:.0f} |")
    print(f"\n- retrain's final val {metric}: {ready:.3f}, reached at {retrain_ready:.0f} s; the migrated arm "
          f"{'reaches it at ' + format(reach, '.0f') + ' s of finetune' if reach is not None else 'does not reach it'} "
          f"(its final: {final:.3f})")
    print(f"- time-to-readiness ratio (retrain's final): {ratio(retrain_ready, before_ft, reach)} for one adapter, "
          f"{ratio(retrain_ready, shared, reach)} with the alignment shared by {FLEET} adapters")
    print(f"- retrain's time to the migrated final quality ({final:.3f}): "
          f"{'never' if retrain_to_final is None else format(retrain_to_final, '.0f') + ' s'}; ratio to the migrated "
          f"time: {ratio(retrain_to_final, before_ft, migrated[-1][0])} (one adapter), "
          f"{ratio(retrain_to_final, shared, migrated[-1][0])} (fleet of {FLEET})")
    curves = {"full retrain": retrain, "scratch (100)": curve(w / "scratch", metric),
              "migrated (incl. the stages before finetune)": [(s + before_ft, v) for s, v in migrated]}
    plot_curves(curves, ready, metric, w / "bench_migration.png", "wall seconds")
    print(f"\nplot: {w / 'bench_migration.png'}")


if __name__ == "__main__":
    main()
