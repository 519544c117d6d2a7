"""`loramigrate fleet`: a recipe's adapters as a task graph on an engine (in-process, a process pool, Ray)."""

from loramigrate.fleet.engines import ENGINES
from loramigrate.fleet.runner import adapter_sources, run_fleet

__all__ = ["ENGINES", "adapter_sources", "run_fleet"]
