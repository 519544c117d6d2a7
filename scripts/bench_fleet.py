"""A fleet against a sequential shell loop, side by side in one run: N copies of the MiniLM adapter migrated
with `scripts/migrate_many.sh` (one `loramigrate run` after another, one shared alignment), then with
`loramigrate fleet`. Reports each arm's wall and CPU seconds, wall per adapter, and the fleet's amortised
compute per adapter (its stages' times from the manifests plus a share of the one alignment), as a markdown
table for BENCHMARKS.md. Both arms start from nothing; run it on an idle machine.

    python scripts/bench_fleet.py --work /tmp/bench-fleet --n 10 --workers 2
    python scripts/bench_fleet.py --work /tmp/bench-fleet --n 2 --set finetune.steps=2 --set eval.limit=16 \
        --set transfer.prompt_limit=32 --set align.max_tokens=256        # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "minilm-l3-to-l6.yaml"
CACHE = Path(os.environ.get("LORAMIGRATE_CACHE", Path.home() / ".cache" / "loramigrate"))


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall s, CPU s of it and its children) of a command, echoed first."""
    print("$", " ".join(cmd), flush=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - started, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="emptied first: adapters/, loop/, fleet/")
    ap.add_argument("--n", type=int, default=10, help="adapters (copies of the MiniLM adapter)")
    ap.add_argument("--adapter", type=Path, default=CACHE / "adapters" / "minilm-l3-multiemo")
    ap.add_argument("--engine", choices=("local", "ray"), default="ray")
    ap.add_argument("--workers", type=int, default=2, help="the fleet's tasks at once (the loop runs one)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe override, both arms")
    args = ap.parse_args()

    shutil.rmtree(args.work, ignore_errors=True)
    adapters = args.work / "adapters"
    for i in range(args.n):
        shutil.copytree(args.adapter, adapters / f"a{i:03d}")
    recipe = args.work / "recipe.yaml"  # the overrides baked in: migrate_many.sh passes no --set
    subprocess.run([sys.executable, "-c", _BAKE, str(RECIPE), str(recipe), *args.overrides], check=True,
                   env=_env())
    loop = timed(["bash", str(ROOT / "scripts" / "migrate_many.sh"), str(recipe), str(adapters),
                  str(args.work / "loop"), "1"], _env())
    fleet = timed([sys.executable, "-m", "loramigrate", "-q", "fleet", str(recipe), "--adapters", str(adapters),
                   "-o", str(args.work / "fleet"), "--engine", args.engine, "--workers", str(args.workers)], _env())
    totals = json.loads((args.work / "fleet" / "fleet.json").read_text())["totals"]
    print(f"\n{args.n} MiniLM adapters, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    print("| arm | wall s | CPU s | wall per adapter s | amortised compute per adapter s |")
    print("|---|---|---|---|---|")
    print(f"| shell loop (migrate_many.sh, 1 at a time) | {loop[0]:.0f} | {loop[1]:.0f} | {loop[0] / args.n:.1f} | – |")
    cpu = f"{fleet[1]:.0f}" if args.engine == "local" else "–"  # Ray's workers are not this script's children
    print(f"| fleet ({args.engine}, {args.workers} workers) | {fleet[0]:.0f} | {cpu} | {fleet[0] / args.n:.1f} | "
          f"{totals['amortised_s']} |")


_BAKE = """
import sys, yaml
from loramigrate.recipes import apply_overrides, load_recipe
src, dst, *overrides = sys.argv[1:]
load_recipe(src, overrides)  # checked as the commands will read it
raw = apply_overrides(yaml.safe_load(open(src)), overrides)
open(dst, "w").write(yaml.safe_dump(raw, sort_keys=False))
"""


def _env() -> dict[str, str]:
    """This interpreter's `loramigrate` first on PATH (the shell loop calls it by name), this checkout importable."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path}


if __name__ == "__main__":
    main()
