"""`run`: a recipe's stages in order over one run directory, each skipped when its manifest matches.

Layout::

    RUN/align/                      the base pair's alignment, shared by every adapter (or --align-dir)
    RUN/<adapter>/transfer|search|finetune|eval/
    RUN/report.md, RUN/summary.json
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from loramigrate.adapters import check_adapter_dir
from loramigrate.align import run_align
from loramigrate.align.activations import read_calibration
from loramigrate.artifacts import read_manifest, refuse_overlap
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.eval import RESULTS, Comparison, Pair, run_eval
from loramigrate.evaluate import read_task
from loramigrate.finetune.runner import run_finetune
from loramigrate.finetune.teacher import check_teacher
from loramigrate.models import resolve_model, shared_vocabulary
from loramigrate.progress import ProgressFn, no_progress
from loramigrate.proxy import NAME as PROXY
from loramigrate.recipes import STAGES, Recipe
from loramigrate.search import run_search
from loramigrate.transfer import run_transfer

log = logging.getLogger(__name__)
ARMS = {"transfer": "transfer only", "search": "searched init", "finetune": "final (finetuned)"}  # the eval's rows


@dataclass
class AdapterRun:
    """What `run` did for one adapter: stage directories and whether each was redone or kept."""

    name: str
    source: str
    dirs: dict[str, Path] = field(default_factory=dict)
    ran: dict[str, bool] = field(default_factory=dict)
    results: list[dict] = field(default_factory=list)

    @property
    def final(self) -> Path:
        return self.dirs.get("finetune") or self.dirs.get("search") or self.dirs["transfer"]


def adapter_names(paths: list[str]) -> list[str]:
    """Directory names, which name each adapter's folder in the run; they must be distinct.

    Raises:
        ConfigError: two adapters with the same directory name.
    """
    names = [Path(p).name for p in paths]
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ConfigError(f"adapters share directory names ({', '.join(clash)}); rename them so each has its folder")
    return names


def check_inputs(recipe: Recipe) -> None:
    """Check every input the recipe names (bases, adapters, data, calibration, prompts, teachers) before the
    first stage: a bad one found by a later stage would come after align's work.

    Raises:
        LoramigrateError: the first input that is missing or does not parse.
    """
    new = resolve_model(recipe.new)
    resolve_model(recipe.old)
    align = recipe.align_config()
    if align.calib:
        read_calibration(Path(align.calib))
    for source in recipe.adapters:
        try:
            check_adapter_dir(source)
        except ArtifactError as e:
            if not recipe.make_adapter:
                raise
            raise ArtifactError(f"{e}; the recipe trains it with: {recipe.make_adapter}") from None
    source = recipe.adapters[0]  # the stages read the same files for every adapter
    reads = [(recipe.data.test, False)]  # (data file, whether its rows may lack labels)
    if prompts := recipe.transfer_config("ALIGN", source).prompts:
        reads.append((prompts, True))
    if recipe.search is not None:
        search = recipe.search_config("ALIGN", "TRANSFER", source)
        reads.append((search.data, search.objective == "distill"))
        if search.fidelity_steps:
            reads.append((search.train, False))
        if search.teacher_adapter:
            check_adapter_dir(search.teacher_adapter)
    if recipe.finetune is not None:
        finetune = recipe.finetune_config("INIT", source)
        distilling = finetune.teacher != "none"
        reads += [(finetune.data, distilling), (finetune.val, distilling)]
        if distilling:
            check_adapter_dir(finetune.teacher_adapter)
            check_teacher(finetune.teacher, read_task(finetune.data, 1, unlabelled=True).kind, new,
                          finetune.teacher_base)
    lenient: dict[str, bool] = {}  # each file parsed once, as strictly as its strictest reader
    for path, unlabelled in reads:
        lenient[path] = lenient.get(path, True) and unlabelled
    for path, unlabelled in lenient.items():
        read_task(path, unlabelled=unlabelled)


def run_layout(recipe: Recipe, run_dir: Path, align_dir: Path) -> list[str]:
    """The adapters' folder names in the run, each refused where its folder would overlap the alignment or an
    input (e.g. an adapter named `align` would write its stages into the alignment)."""
    names = adapter_names(recipe.adapters)
    for name in names:
        refuse_overlap(run_dir / name, [align_dir, *recipe.adapters])
    return names


def run_recipe(recipe: Recipe, run_dir: Path, force_from: str | None = None, align_dir: Path | None = None,
               progress: ProgressFn = no_progress) -> list[AdapterRun]:
    """align → transfer → search → finetune → eval for every adapter of ``recipe``; returns what was done.

    ``force_from`` redoes that stage and every later one even where manifests match.
    """
    if force_from is not None and force_from not in STAGES:
        raise ConfigError(f"--from {force_from!r}: expected one of {', '.join(STAGES)}")
    forced = set(STAGES[STAGES.index(force_from):]) if force_from else set()
    run_dir = Path(run_dir)
    align_out = Path(align_dir) if align_dir else run_dir / "align"
    names = run_layout(recipe, run_dir, align_out)
    check_inputs(recipe)
    align_ran = run_align(recipe.align_config(), align_out, progress, force="align" in forced)
    runs = []
    for name, source in zip(names, recipe.adapters, strict=True):
        r = adapter_run(recipe, name, source, run_dir, align_out)
        r.ran["align"] = align_ran
        for stage in adapter_stages(recipe):
            run_stage(recipe, r, stage, stage in forced, progress)
        runs.append(r)
    return runs


def adapter_stages(recipe: Recipe) -> tuple[str, ...]:
    """An adapter's stages after the shared alignment: every one the recipe does not skip (``search: null``)."""
    return tuple(s for s in STAGES[1:] if getattr(recipe, s) is not None)


def adapter_run(recipe: Recipe, name: str, source: str, run_dir: Path, align_dir: Path) -> AdapterRun:
    """An adapter's stage directories in the run layout, where every stage finds the ones before it: a stage
    can run in another process, or on another machine sharing the run directory."""
    base = Path(run_dir) / name
    return AdapterRun(name=name, source=source,
                      dirs={"align": Path(align_dir), **{s: base / s for s in adapter_stages(recipe)}})


def run_stage(recipe: Recipe, r: AdapterRun, stage: str, force: bool = False, progress: ProgressFn = no_progress) -> None:
    """One stage of one adapter, kept when its manifest matches; it starts from the latest stage before it."""
    align, out = str(r.dirs["align"]), r.dirs[stage]
    before = list(r.dirs)[1:list(r.dirs).index(stage)]  # the adapter's stages that ran before this one
    init = str(r.dirs[before[-1]]) if before else None
    runners = {
        "transfer": lambda: run_transfer(recipe.transfer_config(align, r.source), out, force=force, progress=progress),
        "search": lambda: run_search(recipe.search_config(align, init, r.source), out, progress, force=force),
        "finetune": lambda: run_finetune(recipe.finetune_config(init, r.source), out, progress, force=force),
        "eval": lambda: run_eval(recipe.eval_config(), _comparison(recipe, r), out, progress, force=force),
    }
    r.ran[stage] = runners[stage]()
    if stage == "eval":
        r.results = eval_rows(out)


def eval_rows(eval_dir: Path) -> list[dict]:
    """An eval stage's rows, the reference (old base + old adapter) first."""
    results = json.loads((Path(eval_dir) / RESULTS).read_text())
    return [results["reference"], *results["results"]]


def _comparison(recipe: Recipe, r: AdapterRun) -> Comparison:
    """The report's comparison on the test split: old base + old adapter (the reference for negative flips), new
    base alone, the old adapter copied onto the new base where shapes allow, each stage, and the proxy ensemble
    where the task is generation and the bases share a vocabulary."""
    arms = [Pair("copy (old adapter as is)", recipe.new, r.source),
            *(Pair(ARMS[s], recipe.new, str(r.dirs[s])) for s in ARMS if s in r.dirs)]
    generation = read_task(recipe.data.test, 1).kind == "generation"
    proxy = generation and shared_vocabulary(resolve_model(recipe.old), resolve_model(recipe.new))
    return Comparison(recipe.data.test, Pair("new base alone", recipe.new), tuple(arms),
                      reference=Pair("old base + old adapter", recipe.old, r.source),
                      proxy=Pair(PROXY, recipe.old, r.source) if proxy else None)


def gap_text(row: dict) -> str:
    """A result row's gap recovered as a percentage, or – where the old adapter gains nothing."""
    gap = row.get("gap_recovered")
    return "–" if gap is None else f"{100 * gap:.0f} %"


def stage_costs(r: AdapterRun) -> list[dict]:
    """Wall time, peak RSS and peak GPU memory per stage, from the manifests."""
    rows = []
    for stage in STAGES:
        if stage in r.dirs:
            m = read_manifest(r.dirs[stage])
            peak = m.get("peak_rss_mb")  # the stage's own, or the process's where it cannot be reset
            rows.append({"stage": stage, "wall_s": m.get("wall_s"),
                         "peak_rss_mb": f"{peak} (process)" if m.get("peak_rss_of") == "process" else peak,
                         "peak_gpu_mb": m.get("peak_gpu_mb"),
                         "ran": r.ran.get(stage, False), "dir": str(r.dirs[stage])})
    return rows


def write_report(recipe: Recipe, runs: list[AdapterRun], run_dir: Path, elapsed: float) -> Path:
    """report.md (comparison table, negative flips, time and memory per stage, the stages' plots) and
    summary.json, written atomically."""
    lines = [f"# Migration report: {recipe.name}", "", recipe.description, "",
             f"- old base: `{recipe.old}`", f"- new base: `{recipe.new}`", f"- test data: `{recipe.data.test}`",
             f"- this invocation: {elapsed:.1f} s", ""]
    summary = {"recipe": recipe.model_dump(), "adapters": {}}
    for r in runs:
        metric = next((x["metric"] for x in r.results if "metric" in x), "score")
        lines += [f"## {r.name}", "", f"| arm | n | loss | {metric} | gap recovered | negative flips |",
                  "|---|---|---|---|---|---|"]
        for x in r.results:
            if "note" in x:
                lines.append(f"| {x['arm']} | – | – | – | – | {x['note']} |")
            else:
                lines.append(f"| {x['arm']} | {x['n']} | {x['loss']:.4f} | {x['score']:.4f} | {gap_text(x)} | "
                             f"{x.get('negative_flips', '–') if x['arm'] != 'old base + old adapter' else 'reference'} |")
        costs = stage_costs(r)
        lines += ["", "| stage | wall s | peak RSS MB | peak GPU MB | this run |", "|---|---|---|---|---|"]
        lines += [f"| {c['stage']} | {c['wall_s']} | {c['peak_rss_mb']} | {c['peak_gpu_mb'] or '–'} | "
                  f"{'ran' if c['ran'] else 'kept'} |" for c in costs]
        plots = [p for stage in ("align", "search", "finetune") if stage in r.dirs
                 for p in sorted(r.dirs[stage].glob("*.png"))]
        lines += [""] + [f"![{p.parent.name}/{p.name}]({p.relative_to(run_dir) if p.is_relative_to(run_dir) else p})"
                         for p in plots] + [""]
        summary["adapters"][r.name] = {"final": str(r.final), "results": r.results, "stages": costs}
    report = run_dir / "report.md"
    write_atomically(report, "\n".join(lines))
    write_atomically(run_dir / "summary.json", json.dumps(summary, indent=2))
    return report


def write_atomically(path: Path, text: str) -> None:
    """A report file that is either the old one or the new one, never half written."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")  # concurrent runs never share a temp file
    tmp.write_text(text)
    tmp.replace(path)


def timed_run(recipe: Recipe, run_dir: Path, force_from: str | None = None, align_dir: Path | None = None,
              progress: ProgressFn = no_progress) -> tuple[list[AdapterRun], Path]:
    started = time.perf_counter()
    runs = run_recipe(recipe, run_dir, force_from, align_dir, progress)
    return runs, write_report(recipe, runs, Path(run_dir), time.perf_counter() - started)
