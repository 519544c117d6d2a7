"""The eval stage: a comparison of arms on one task, as a results document or a stage directory
(``results.json`` + manifest). The metrics themselves are ``loramigrate.evaluate``'s.

The document: ``{"data", "base", "metric", "reference": row | None, "results": [row, …]}``; a row is
``{"arm", "name", "n", "loss", <metric>, "metric", "score"}`` with ``negative_flips`` and ``gap_recovered``
where a reference is given, or ``{"arm", "note"}`` for an adapter that does not load on the base.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from loramigrate.adapters import check_adapter_dir
from loramigrate.artifacts import hash_inputs, is_up_to_date, log_start, prepare_output, stage_output
from loramigrate.config import EvalConfig
from loramigrate.errors import ArtifactError
from loramigrate.evaluate import EvalResult, evaluate_pairs, read_task, with_flips, with_gap
from loramigrate.models import resolve_model
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.proxy import evaluate_proxy

log = logging.getLogger(__name__)
STAGE = "eval"
RESULTS = "results.json"


@dataclass(frozen=True)
class Pair:
    """One arm: ``adapter`` on ``base`` (None: the base alone), shown as ``label``."""

    label: str
    base: str
    adapter: str | None = None


@dataclass(frozen=True)
class Comparison:
    """What an evaluation compares on ``data``: ``base`` alone, then each adapter on it. ``reference`` (the old
    pair) is what negative flips and the gap recovered are measured against; ``proxy`` (an old pair) adds the proxy
    ensemble of it with ``base``."""

    data: str
    base: Pair
    adapters: tuple[Pair, ...] = ()  # on base.base
    reference: Pair | None = None
    proxy: Pair | None = None

    def arms(self) -> dict[str, object]:
        """The labels of every arm, in the manifest's config: what the stage compared."""
        return {"base": self.base.label, "adapters": [a.label for a in self.adapters],
                "reference": self.reference and self.reference.label, "proxy": self.proxy and self.proxy.label}

    def inputs(self) -> dict[str, str]:
        """Every model, adapter and data path by a stable name (models as resolved: a GGUF file itself).

        Raises:
            ArtifactError: a model that does not exist, an adapter directory that does not exist or holds
                NaN or inf values.
        """
        names = {"data": self.data, "base": resolve_model(self.base.base).path}
        names |= {f"adapters.{i}": a.adapter for i, a in enumerate(self.adapters)}
        for role, pair in (("reference", self.reference), ("proxy", self.proxy)):
            if pair is not None:
                names |= {f"{role}_base": resolve_model(pair.base).path, f"{role}_adapter": pair.adapter}
        for name, path in names.items():
            if name.endswith("adapter") or name.startswith("adapters."):
                check_adapter_dir(path)
        return names


def _row(label: str, res: EvalResult | None, reference: EvalResult | None, alone: EvalResult) -> dict:
    """One arm with its negative flips against ``reference`` (unless it is the reference) and its gap recovered;
    an arm without a result did not load."""
    if res is None:
        return {"arm": label, "note": "does not load: shapes differ"}
    if reference is not None:
        (res,) = with_gap(with_flips([res], reference) if res is not reference else [res], reference, alone)
    return {"arm": label, **res.summary(), "metric": res.metric, "score": res.score}


def compare(comparison: Comparison, cfg: EvalConfig, progress: ProgressFn = no_progress) -> dict:
    """Evaluate every arm of ``comparison``; returns the results document (module docstring).

    Raises:
        ArtifactError: unreadable data or models, or a reference adapter that does not load on its base.
        ConfigError: a proxy ensemble the task or the tokenizers do not allow.
    """
    c, load, batch = comparison, cfg.load, cfg.batch_size
    c.inputs()  # fail on a missing model or adapter before any heavy work
    task = read_task(c.data, cfg.limit)
    # the proxy first: it refuses what it cannot evaluate
    proxy = evaluate_proxy(c.base.base, c.proxy.base, c.proxy.adapter, task, batch, load, progress) if c.proxy else None
    reference = None
    if c.reference is not None:
        found = evaluate_pairs(c.reference.base, [c.reference.adapter], task, batch, load, progress, include_base=False)
        if not found:
            raise ArtifactError(f"{c.reference.adapter} does not load on {c.reference.base}")
        reference = found[0]
    alone, *adapted = evaluate_pairs(c.base.base, [a.adapter for a in c.adapters], task, batch, load, progress)
    by_dir = {res.adapter: res for res in adapted}  # an adapter that does not fit the base has no result
    arms = [(c.base.label, alone), *((a.label, by_dir.get(a.adapter)) for a in c.adapters),
            *([(c.proxy.label, proxy)] if c.proxy else [])]
    return {"data": c.data, "base": c.base.base, "metric": alone.metric,
            "reference": _row(c.reference.label, reference, reference, alone) if reference else None,
            "results": [_row(label, res, reference, alone) for label, res in arms]}


def run_eval(cfg: EvalConfig, comparison: Comparison, out_dir: Path, progress: ProgressFn = no_progress,
             force: bool = False) -> bool:
    """Write the comparison's results document into the stage directory ``out_dir``.

    Returns:
        True when it evaluated, False when ``out_dir`` already held this comparison of the same inputs.
    """
    out_dir = Path(out_dir)
    names = comparison.inputs()
    prepare_output(out_dir, inputs=names.values())
    inputs = hash_inputs(names)
    config = {**cfg.model_dump(), "arms": comparison.arms()}
    if not force and is_up_to_date(out_dir, STAGE, config, inputs):
        log.info("%s is up to date; skipping eval (use --force to redo)", out_dir)
        return False
    with stage_output(out_dir, STAGE, config, inputs) as run:
        log_start(STAGE, out_dir, cfg, config)
        results = compare(comparison, cfg, progress)
        (run.tmp_dir / RESULTS).write_text(json.dumps(results, indent=2))
    return True
