"""The fleet report: RUN/fleet.json and RUN/fleet.md, one row per adapter, from the task results and the
stages' own manifests and eval results (so a kept adapter reports the figures of the run that made it)."""

from __future__ import annotations

import json
from pathlib import Path

from loramigrate.artifacts import read_manifest
from loramigrate.pipeline import ARMS, adapter_run, adapter_stages, eval_rows, gap_text, stage_costs, write_atomically
from loramigrate.recipes import Recipe


def adapter_row(recipe: Recipe, name: str, source: str, run_dir: Path, tasks: dict[str, dict]) -> dict:
    """An adapter's row: status (migrated, kept: every stage up to date, failed), where each task ran, and for a
    finished one its metric before (old pair) and after (final adapter on the new base) and its stage times.

    ``tasks``: this adapter's task results by stage (search workers under ``search-worker-<i>``).
    """
    where = {stage: _where(t) for stage, t in tasks.items() if "pid" in t}
    failed = next((t for t in tasks.values() if "error" in t), None)
    if failed is not None:
        return {"adapter": name, "source": source, "status": "failed", "error": failed["error"],
                "failed_in": failed.get("failed_in", failed["task"]).removeprefix(f"{name}/"), "where": where}
    r = adapter_run(recipe, name, source, run_dir, run_dir / "align")
    r.ran = {stage: tasks[stage]["ran"] for stage in adapter_stages(recipe)}
    r.results = eval_rows(r.dirs["eval"])
    arms = {x["arm"]: x for x in r.results}
    final = arms.get(ARMS.get(r.final.name), {})
    return {"adapter": name, "source": source, "status": "migrated" if any(r.ran.values()) else "kept",
            "final": str(r.final), "metric": arms["old base + old adapter"].get("metric"),
            "before": arms["old base + old adapter"].get("score"), "new_base": arms["new base alone"].get("score"),
            "after": final.get("score"), "gap_recovered": final.get("gap_recovered"),
            "negative_flips": final.get("negative_flips"),
            "stage_s": {c["stage"]: c["wall_s"] for c in stage_costs(r) if c["stage"] != "align"},
            "ran": r.ran, "where": where}


def _where(task: dict) -> str:
    node = f" node {task['node'][:8]}" if task.get("node") else ""
    return f"{task['host']}:{task['pid']}{node}"


def totals(rows: list[dict], align_dir: Path, align: dict | None, wall_s: float) -> dict:
    """Counts, whether the alignment was computed now (``align``: its task's result, None when no task ran), this
    invocation's wall time, and the compute per finished adapter: its stages' times from their manifests plus its
    share of the one alignment."""
    done = [r for r in rows if r["status"] != "failed"]
    align_s = read_manifest(align_dir).get("wall_s", 0) if (align_dir / "manifest.json").is_file() else 0
    stage_s = sum(sum(v for v in r["stage_s"].values() if v) for r in done)
    return {"adapters": len(rows), **{s: sum(r["status"] == s for r in rows) for s in ("migrated", "kept", "failed")},
            "align_ran": (align or {}).get("ran"), "wall_s": round(wall_s, 1), "align_s": align_s,
            "stage_s": round(stage_s, 1),
            "amortised_s": round((align_s + stage_s) / len(done), 1) if done else None,
            "wall_per_adapter_s": round(wall_s / len(rows), 1) if rows else None}


def write_fleet_report(recipe: Recipe, engine: str, rows: list[dict], total: dict, run_dir: Path) -> Path:
    """fleet.md and fleet.json, each written atomically; returns fleet.md."""
    stages = adapter_stages(recipe)
    lines = [f"# Fleet report: {recipe.name}", "", f"- old base: `{recipe.old}`", f"- new base: `{recipe.new}`",
             f"- engine: {engine}; this invocation {total['wall_s']} s for {total['adapters']} adapters "
             f"({total['migrated']} migrated, {total['kept']} kept up to date, {total['failed']} failed)",
             f"- compute: alignment {total['align_s']} s (once), adapter stages {total['stage_s']} s; "
             f"amortised {total['amortised_s']} s per finished adapter", "",
             f"| adapter | status | before | new base | after | gap recovered | negative flips | "
             f"{' | '.join(f'{s} s' for s in stages)} | where |",
             "|---|---|---|---|---|---|---|" + "---|" * len(stages) + "---|"]
    for r in rows:
        where = ", ".join(sorted(set(r["where"].values())))
        if r["status"] == "failed":
            lines.append(f"| {r['adapter']} | failed in {r['failed_in']} | " + "– | " * (5 + len(stages)) + f"{where} |")
            continue
        scores = [_score(r[k]) for k in ("before", "new_base", "after")]
        lines.append(f"| {r['adapter']} | {r['status']} | {' | '.join(scores)} | {gap_text(r)} | "
                     f"{r['negative_flips'] if r['negative_flips'] is not None else '–'} | "
                     f"{' | '.join(str(r['stage_s'].get(s, '–')) for s in stages)} | {where} |")
    failures = [f"- **{r['adapter']}**: {r['error']}" for r in rows if r["status"] == "failed"]
    lines += ["", "Scores are the eval's metric on the test split (before: old base + old adapter; after: the final "
              "adapter on the new base).", *(["", "## Failures", "", *failures] if failures else []), ""]
    report = run_dir / "fleet.md"
    summary = {"recipe": recipe.name, "engine": engine, "totals": total, "adapters": rows}
    write_atomically(report, "\n".join(lines))
    write_atomically(run_dir / "fleet.json", json.dumps(summary, indent=2))
    return report


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"
