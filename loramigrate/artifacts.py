"""Stage directories: self-describing manifests, content hashes, atomic writes, resume checks.

A stage writes into ``<out>.tmp-<pid>`` and renames it to ``<out>`` only after the manifest is
written, so a directory named like the output is always complete. While it writes, it holds
``<out>.lock``, so a second process writing the same output fails at once instead of mixing files.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import logging
import os
import re
import resource
import shutil
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel

from loramigrate import __version__
from loramigrate.adapters import check_written_adapter
from loramigrate.errors import ArtifactError
from loramigrate.models import resolved_load

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20
# the format of each stage's directory: bump a stage's number when what it writes changes meaning, so
# that directories of that stage written before are redone, and a mere release invalidates nothing
SCHEMAS = {"align": 3, "transfer": 1, "search": 1, "finetune": 1, "eval": 2}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_input(path: str | Path) -> str:
    """Content hash of a file or a directory (all files, sorted by relative path; the manifest and
    ``cache/``, which later stages may fill, are left out).

    A hub model, ``<id>@<commit>`` as ``resolve_model`` pins it, hashes to ``hub:<id>@<commit>``: a commit
    names its content.
    """
    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    if p.is_dir():
        h = hashlib.sha256()
        files = (q for q in p.rglob("*") if q.is_file() and q.name != MANIFEST and q.relative_to(p).parts[0] != "cache")
        for f in sorted(files):
            h.update(str(f.relative_to(p)).encode())
            h.update(sha256_file(f).encode())
        return h.hexdigest()
    return f"hub:{path}"


def hash_inputs(inputs: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """``{name: {"path", "sha256"}}`` for a stage's inputs; computed once per run (models are GBs)."""
    return {k: {"path": str(v), "sha256": hash_input(v)} for k, v in inputs.items()}


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def log_start(stage: str, out_dir: Path, cfg: BaseModel, config: Mapping[str, Any] | None = None) -> None:
    """One INFO line for a stage that starts: what, where, and the options that differ from the defaults; the
    whole resolved ``config`` (default: ``cfg``'s) at DEBUG (-v)."""
    given = ", ".join(f"{k}={v}" for k, v in _flat(cfg.model_dump(exclude_defaults=True)))
    log.info("%s → %s%s", stage, out_dir, f" ({given})" if given else "")
    log.debug("%s config:\n%s", stage, yaml.safe_dump(dict(config or cfg.model_dump()), sort_keys=False))


def _flat(d: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for k, v in d.items():
        yield from _flat(v, f"{prefix}{k}.") if isinstance(v, Mapping) else [(prefix + k, v)]


def reset_peak_rss() -> str:
    """Start measuring one stage's peak memory: Linux resets the process's high-water mark (VmHWM) when 5 is
    written to /proc/self/clear_refs. Returns what ``peak_rss_mb`` then covers: "stage", or "process" where
    the mark cannot be reset (another OS, a restricted /proc)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return "process"
    return "stage"


def peak_rss_mb() -> float:
    """Peak resident memory in MiB since the last ``reset_peak_rss`` (Linux's VmHWM), else of the process so far."""
    try:
        return int(re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1)) / 1024
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def reset_peak_gpu() -> None:
    """Start measuring one stage's peak GPU memory (PyTorch's allocator; a process that never used CUDA starts at 0)."""
    if torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def peak_gpu_mb() -> float | None:
    """Peak GPU memory PyTorch allocated since ``reset_peak_gpu``, in MiB (``torch.cuda.max_memory_allocated`` of the
    current device); None where this process never used CUDA."""
    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_initialized() else None


def read_manifest(stage_dir: Path) -> dict[str, Any]:
    path = Path(stage_dir) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{stage_dir} is not a finished stage directory (no {MANIFEST}); rerun its stage")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); rerun its stage") from None


def check_stage(stage_dir: Path, stage: str) -> dict[str, Any]:
    """Read and validate the manifest of an input stage directory."""
    manifest = read_manifest(stage_dir)
    if manifest.get("stage") != stage:
        raise ArtifactError(f"{stage_dir} holds a '{manifest.get('stage')}' stage, expected '{stage}'")
    if manifest.get("schema") != SCHEMAS[stage]:
        raise ArtifactError(
            f"{stage_dir} holds a {stage} directory of format {manifest.get('schema', 'unrecorded')} (loramigrate "
            f"{manifest.get('version')}); this loramigrate reads format {SCHEMAS[stage]}; rerun its stage"
        )
    return manifest


@dataclass
class StageRun:
    """What a runner records while it works; ``finish`` turns it into the manifest."""

    stage: str
    config: dict[str, Any]
    inputs: dict[str, dict[str, str]]  # from hash_inputs
    tmp_dir: Path
    started: float = field(default_factory=time.time)
    peak_of: str = "process"  # what peak_rss_mb covers: this stage (its lock reset the mark), or the process
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        load = self.config.get("load", {})
        return {
            "stage": self.stage,
            "schema": SCHEMAS[self.stage],
            "version": __version__,
            "config": self.config,
            "config_hash": config_hash(self.config),
            "runtime": resolved_load(load.get("dtype", "auto"), load.get("device", "auto")),  # what "auto" meant here
            "inputs": self.inputs,
            "command": sys.argv,
            "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
            "wall_s": round(time.time() - self.started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            "peak_rss_of": self.peak_of,
            "peak_gpu_mb": None if (gpu := peak_gpu_mb()) is None else round(gpu, 1),
            **self.extra,
        }


def prepare_output(out_dir: Path, allow: tuple[str, ...] = (), inputs: Iterable[str | Path] = ()) -> None:
    """Fail before any heavy work if the output path cannot become a stage directory.

    ``allow`` names files a stage keeps in its output directory while it runs (search's study);
    ``inputs`` are the paths the stage reads (hub ids among them are skipped), which its output must not overlap.
    """
    refuse_overlap(out_dir, [p for p in inputs if Path(p).exists()])
    if out_dir.is_symlink() and not out_dir.exists():
        raise ArtifactError(f"output path {out_dir} is a dangling symlink; remove it or choose another path")
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"output path {out_dir} is a file; choose a directory path")
    own = (MANIFEST, *allow)
    foreign = out_dir.is_dir() and any(not p.name.startswith(own) for p in out_dir.iterdir())
    if foreign and not (out_dir / MANIFEST).is_file():
        raise ArtifactError(f"output directory {out_dir} exists and is not a loramigrate stage; choose another")
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise ArtifactError(f"cannot create {out_dir}: {parent} is a file")


def refuse_overlap(out_dir: Path, inputs: Iterable[str | Path]) -> None:
    """An output inside an input would be written into it (a model, an adapter, an alignment), and an input
    inside the output would be deleted when the output is replaced.

    Raises:
        ArtifactError: ``out_dir`` and an input are the same path or one holds the other.
    """
    out = Path(out_dir).resolve()
    for given in inputs:
        src = Path(given).resolve()
        if out == src or src in out.parents or out in src.parents:
            raise ArtifactError(f"output {out_dir} overlaps the input {given}; choose an output outside every input")


def is_up_to_date(out_dir: Path, stage: str, config: Mapping[str, Any], inputs: Mapping[str, dict[str, str]]) -> bool:
    """True when ``out_dir`` is a finished run of this stage with the same config and input content.

    ``inputs`` comes from ``hash_inputs``.
    """
    if not (out_dir / MANIFEST).is_file():
        return False
    try:
        m = check_stage(out_dir, stage)
    except ArtifactError:
        return False
    if m.get("config_hash") != config_hash(dict(config)):
        return False
    recorded = m.get("inputs", {})
    return set(recorded) == set(inputs) and all(recorded[k].get("sha256") == v["sha256"] for k, v in inputs.items())


# outputs this process holds the lock of (a runner's stage_output re-enters it) → when the stage took it, and what
# the peak memory measured since covers: a stage's time and memory count from its lock, model loading included
_HELD: dict[Path, tuple[float, str]] = {}


@contextlib.contextmanager
def output_lock(out_dir: Path) -> Iterator[None]:
    """Hold ``<out>.lock`` (an flock, released by the kernel even on kill -9) while writing ``out_dir``, and
    first remove what dead processes left beside it; re-entrant within a process.

    Raises:
        ArtifactError: another process holds the lock, or the lock cannot be created there.
    """
    key = Path(out_dir).absolute()
    if key in _HELD:
        yield
        return
    path = key.with_name(f"{key.name}.lock")
    fd = _lock(path, out_dir)
    _HELD[key] = (time.time(), reset_peak_rss())
    reset_peak_gpu()
    try:
        remove_leftovers(key)
        yield
    finally:
        del _HELD[key]
        path.unlink(missing_ok=True)  # before closing: a process waiting on this inode retries on a new one
        os.close(fd)


def _lock(path: Path, out_dir: Path) -> int:
    """The descriptor of the locked ``path``, which then names this process's pid."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ArtifactError(f"cannot write beside {out_dir}: {e.strerror}") from None
        holder = os.pread(fd, 32, 0).decode().strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ArtifactError(_held_by(holder, path, out_dir)) from None
        with contextlib.suppress(FileNotFoundError):
            if os.stat(path).st_ino == os.fstat(fd).st_ino:  # else its holder unlinked it as we opened it
                if holder.isdigit() and int(holder) != os.getpid():  # a holder that exits removes the file
                    log.warning("taking over %s, left by process %s, which is gone", path, holder)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                return fd
        os.close(fd)


def _held_by(holder: str, path: Path, out_dir: Path) -> str:
    """Why the lock is taken: its writer runs, or it died and a process it started holds the lock still."""
    if holder.isdigit() and not pid_alive(int(holder)):
        return (f"{path} is still held by a child of process {holder}, which died writing {out_dir}; "
                f"stop that child process, or delete {path}")
    return f"another loramigrate process is writing {out_dir} (pid {holder or 'unknown'})"


def remove_leftovers(out_dir: Path) -> None:
    """Remove the ``<out>.tmp-<pid>`` and ``<out>.old-<pid>`` directories of processes that died writing
    ``out_dir`` (a kill between creating and publishing them)."""
    for p in out_dir.parent.glob(f"{glob.escape(out_dir.name)}.*-*"):
        kind, _, pid = p.name[len(out_dir.name) + 1:].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and not pid_alive(int(pid)):
            log.info("removing %s, left by process %s, which is gone", p, pid)
            shutil.rmtree(p, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs with that pid."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


@contextlib.contextmanager
def stage_output(
    out_dir: Path, stage: str, config: dict[str, Any], inputs: dict[str, dict[str, str]], allow: tuple[str, ...] = ()
) -> Iterator[StageRun]:
    """Yield a run whose ``tmp_dir`` receives the outputs; publish it atomically on success.

    An adapter holding NaN or inf is never published. On any exception the temporary directory is removed
    and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    prepare_output(out_dir, allow, [v["path"] for v in inputs.values()])
    with output_lock(out_dir):
        tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        started, peak_of = _HELD[out_dir.absolute()]
        run = StageRun(stage=stage, config=config, inputs=inputs, tmp_dir=tmp, started=started, peak_of=peak_of)
        try:
            yield run
            check_written_adapter(tmp, stage)
            (tmp / MANIFEST).write_text(json.dumps(run.manifest(), indent=2))
            _publish(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    gpu = peak_gpu_mb()
    log.info("wrote %s in %.1f s (peak RSS %.0f MB%s)", out_dir, time.time() - run.started, peak_rss_mb(),
             "" if gpu is None else f", peak GPU {gpu:.0f} MB")


def _publish(tmp: Path, out_dir: Path) -> None:
    """Rename ``tmp`` to ``out_dir``, replacing a previous output only once the new one is complete."""
    if not out_dir.exists():
        tmp.rename(out_dir)
        return
    old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
    out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old)
