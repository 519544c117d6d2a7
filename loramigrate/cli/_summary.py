"""The one-screen rich summary that `run` and `demo` end with."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table


def print_summary(runs, report: Path) -> None:
    from loramigrate.pipeline import gap_text

    console = Console()
    for r in runs:
        metric = next((x["metric"] for x in r.results if "metric" in x), "score")
        table = Table(title=f"{r.name}: {metric} on the test split (higher is better)")
        for col in ("arm", "n", "loss", metric, "gap recovered", "negative flips"):
            table.add_column(col, justify="left" if col == "arm" else "right")
        for x in r.results:
            if "note" in x:
                table.add_row(x["arm"], "–", "–", "–", "–", x["note"])
            else:
                flips = "reference" if x["arm"].startswith("old base") else str(x.get("negative_flips", "–"))
                table.add_row(x["arm"], str(x["n"]), f"{x['loss']:.4f}", f"{x['score']:.4f}", gap_text(x), flips)
        console.print(table)
        kept = [s for s, ran in r.ran.items() if not ran]
        console.print(f"final adapter: {r.final}" + (f"  (kept from earlier runs: {', '.join(kept)})" if kept else ""))
    console.print(f"report: {report}")
