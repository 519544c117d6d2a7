"""Progress reporting without a UI dependency: library loops call ``progress(task, done, total)``."""

from collections.abc import Callable

ProgressFn = Callable[[str, int, int], None]


def no_progress(task: str, done: int, total: int) -> None:
    """Default callback: report nothing."""
