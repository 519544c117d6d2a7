"""Progress reporting without a UI dependency: library loops call ``progress(task, done, total)``."""

from typing import Protocol


class ProgressFn(Protocol):
    """``done`` of ``total`` units of ``task`` are finished; ``note`` says how it goes (e.g. the latest loss)."""

    def __call__(self, task: str, done: int, total: int, note: str = "") -> None: ...


def no_progress(task: str, done: int, total: int, note: str = "") -> None:
    """Default callback: report nothing."""
