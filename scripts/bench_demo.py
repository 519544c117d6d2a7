"""`loramigrate demo` from an empty cache, as a newcomer runs it: the fetch and the demo after it, timed apart.

Both run as child processes of this interpreter, with a new empty $LORAMIGRATE_CACHE and working directory
(removed afterwards): `python -m loramigrate.testbed --demo` (what the demo's first run fetches: downloads
through pip and its index settings, checks, conversions), then `python -m loramigrate demo` (the old
adapter's training and the migration; its table goes to stdout as usual). `--again` also times a second
demo into a new run directory (the old adapter kept, as on any later run). Reports wall and CPU seconds of
each, the machine's cores and load average before and after, and one markdown row for BENCHMARKS.md and the
README. Run it on an idle machine: a busy one gives a figure for its load, not the demo's.

    python scripts/bench_demo.py
    python scripts/bench_demo.py --wheels ~/.cache/loramigrate/wheels   # no downloads: the fetch converts only
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path


def timed(cmd: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall s, CPU s) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheels", type=Path, help="link these already downloaded files into the empty cache's wheels/")
    ap.add_argument("--again", action="store_true", help="also time a second demo (a later run)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary cache and run directory")
    args = ap.parse_args()

    load_before = os.getloadavg()
    if load_before[0] > 1.0:
        print(f"warning: load average {load_before[0]:.2f}: the machine is busy, the figure will show it", file=sys.stderr)
    root = Path(tempfile.mkdtemp(prefix="bench-demo-"))
    cache, cwd = root / "cache", root / "cwd"
    cwd.mkdir()
    if args.wheels:
        (cache / "wheels").mkdir(parents=True)
        for f in args.wheels.iterdir():
            (cache / "wheels" / f.name).symlink_to(f.resolve())
    env = {**os.environ, "LORAMIGRATE_CACHE": str(cache)}
    try:
        fetch = timed([sys.executable, "-m", "loramigrate.testbed", "--demo"], env, cwd)
        demo = timed([sys.executable, "-m", "loramigrate", "demo"], env, cwd)
        again = timed([sys.executable, "-m", "loramigrate", "demo", "-o", "runs/again"], env, cwd) if args.again else None
        size = du(cache)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    import torch

    total = fetch[0] + demo[0]
    source = "wheels linked, conversions only" if args.wheels else "downloads included"
    state = (f"{os.cpu_count()} cores, load average {load_before[0]:.2f} before / {load_after[0]:.2f} after; "
             f"{platform.python_version()}, torch {torch.__version__}")
    print(f"fetch: {minutes(fetch[0])} wall, {fetch[1]:.0f} s CPU ({source}; cache {size / 1e6:.0f} MB)")
    print(f"demo after the fetch: {minutes(demo[0])} wall, {demo[1]:.0f} s CPU")
    if again:
        print(f"demo again (old adapter kept): {minutes(again[0])} wall, {again[1]:.0f} s CPU")
    print(f"machine: {state}")
    later = f" | later runs {minutes(again[0])}" if again else ""
    print(f"| {date.today().isoformat()} | `loramigrate demo` from an empty cache | {minutes(total)} = fetch "
          f"{minutes(fetch[0])} ({source}) + demo {minutes(demo[0])}{later} | {state} |")


if __name__ == "__main__":
    main()
