"""Where a fleet's tasks run, by name: ``local`` (this process, or a pool of processes) and ``ray`` (a Ray cluster).

An engine is a context manager giving ``submit(task) -> Future`` of the task's result dict; the scheduler
(graph.execute) is the same for all.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor

from loramigrate.config import FleetConfig
from loramigrate.errors import ConfigError
from loramigrate.fleet.graph import Submit, Task


@contextlib.contextmanager
def local_engine(fleet: FleetConfig) -> Iterator[Submit]:
    """One task at a time in this process, or ``workers`` processes (spawned: torch is not fork-safe)."""
    if fleet.workers == 1:
        yield _in_process
        return
    with ProcessPoolExecutor(fleet.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda task: pool.submit(task.call, *task.args)


def _in_process(task: Task) -> Future:
    future: Future = Future()
    future.set_result(task.call(*task.args))
    return future


@contextlib.contextmanager
def ray_engine(fleet: FleetConfig) -> Iterator[Submit]:
    """Tasks on the Ray cluster this process is connected to, else the one at ``address``, else a private local
    one with ``workers`` CPUs (shut down at the end); each task asks for the fleet's CPUs, GPUs and memory.

    Raises:
        ConfigError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError("--engine ray needs Ray: pip install loramigrate[fleet]") from None
    started = not ray.is_initialized()
    if started:
        ray.init(address=fleet.address, num_cpus=None if fleet.address else fleet.workers, include_dashboard=False)
    memory = {"memory": int(fleet.memory_gb * 2**30)} if fleet.memory_gb else {}
    # a task killed with its worker (a node lost, the OOM killer) is tried once more: the stage resumes
    options = {"num_cpus": fleet.cpus, "num_gpus": fleet.gpus, "max_retries": 1, **memory}
    remote = ray.remote(_on_node)
    try:
        yield lambda task: remote.options(name=task.id, **options).remote(task.call, *task.args).future()
    finally:
        if started:
            ray.shutdown()


def _on_node(call, *args) -> dict:
    """A task's result with the Ray node it ran on."""
    import ray

    return {**call(*args), "node": ray.get_runtime_context().get_node_id()}


ENGINES = {"local": local_engine, "ray": ray_engine}
