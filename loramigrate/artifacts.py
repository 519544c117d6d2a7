"""Stage directories: self-describing manifests, content hashes, atomic writes, resume checks.

A stage writes into ``<out>.tmp-<pid>`` and renames it to ``<out>`` only after the manifest is
written, so a directory named like the output is always complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import resource
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from loramigrate import __version__
from loramigrate.errors import ArtifactError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_input(path: str | Path) -> str:
    """Content hash of a file or a directory (all files, sorted by relative path; the manifest and
    ``cache/``, which later stages may fill, are left out).

    Hub ids that are not local paths hash to ``hub:<id>``: their content is pinned by the hub.
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


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    if manifest.get("version") != __version__:
        raise ArtifactError(
            f"{stage_dir} was written by loramigrate {manifest.get('version')}, this is {__version__}; "
            "rerun its stage"
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
    extra: dict[str, Any] = field(default_factory=dict)

    def manifest(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "version": __version__,
            "config": self.config,
            "config_hash": config_hash(self.config),
            "inputs": self.inputs,
            "command": sys.argv,
            "started": datetime.fromtimestamp(self.started, timezone.utc).isoformat(),
            "finished": datetime.now(timezone.utc).isoformat(),
            "wall_s": round(time.time() - self.started, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1),
            **self.extra,
        }


def prepare_output(out_dir: Path, allow: tuple[str, ...] = ()) -> None:
    """Fail before any heavy work if the output path cannot become a stage directory.

    ``allow`` names files a stage keeps in its output directory while it runs (search's study).
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ArtifactError(f"output path {out_dir} is a file; choose a directory path")
    own = (MANIFEST, *allow)
    foreign = out_dir.is_dir() and any(not p.name.startswith(own) for p in out_dir.iterdir())
    if foreign and not (out_dir / MANIFEST).is_file():
        raise ArtifactError(f"output directory {out_dir} exists and is not a loramigrate stage; choose another")
    parent = out_dir.parent
    if parent.exists() and not parent.is_dir():
        raise ArtifactError(f"cannot create {out_dir}: {parent} is a file")


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


@contextlib.contextmanager
def stage_output(
    out_dir: Path, stage: str, config: dict[str, Any], inputs: dict[str, dict[str, str]], allow: tuple[str, ...] = ()
) -> Iterator[StageRun]:
    """Yield a run whose ``tmp_dir`` receives the outputs; publish it atomically on success.

    On any exception the temporary directory is removed and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir)
    prepare_output(out_dir, allow)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    run = StageRun(stage=stage, config=config, inputs=inputs, tmp_dir=tmp)
    try:
        yield run
        (tmp / MANIFEST).write_text(json.dumps(run.manifest(), indent=2))
        if out_dir.exists():
            old = out_dir.with_name(f"{out_dir.name}.old-{os.getpid()}")
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out_dir)
