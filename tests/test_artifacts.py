"""Stage directories: what manifests record, which old artifacts stay valid, outputs that overlap inputs, locks
left by killed processes, adapters that are not finite.

    pytest tests/test_artifacts.py
"""

import json
import logging
import os
import signal
import subprocess
import sys

import pytest
import torch

from loramigrate import artifacts
from loramigrate.adapters import LoraAdapter, LoraModule, write_adapter
from loramigrate.artifacts import check_stage, hash_inputs, output_lock, stage_output
from loramigrate.errors import ArtifactError
from tests.helpers import lock_holder

LOAD = {"load": {"dtype": "auto", "device": "auto"}}


def write_stage(out, stage="align", config=LOAD, inputs=None):
    with stage_output(out, stage, config, inputs or {}) as run:
        (run.tmp_dir / "result.txt").write_text("done")
    return json.loads((out / artifacts.MANIFEST).read_text())


def test_the_manifest_records_what_auto_resolved_to(tmp_path):
    manifest = write_stage(tmp_path / "out")
    assert manifest["runtime"] == {"dtype": "float32", "device": "cpu"}  # the test machines have no CUDA
    assert manifest["schema"] == artifacts.SCHEMAS["align"]


def test_each_stage_records_its_own_peak_memory(tmp_path):
    """The process peak would give every stage the peak of the largest one before it (the report showed one
    figure for all four); each stage's lock resets the high-water mark on Linux, or the manifest says "process"."""
    with stage_output(tmp_path / "big", "align", LOAD, {}) as run:
        held = torch.ones(400 * 2**20 // 4)  # 400 MiB, touched
        (run.tmp_dir / "result.txt").write_text(str(float(held[-1])))
    del held
    big = json.loads((tmp_path / "big" / artifacts.MANIFEST).read_text())
    small = write_stage(tmp_path / "small")
    resettable = os.path.exists("/proc/self/clear_refs")
    assert big["peak_rss_of"] == small["peak_rss_of"] == ("stage" if resettable else "process")
    assert big["peak_rss_mb"] > 400
    if resettable:
        assert small["peak_rss_mb"] < big["peak_rss_mb"] - 300


def test_the_schema_not_the_release_decides_validity(tmp_path, monkeypatch):
    out = tmp_path / "out"
    manifest = write_stage(out)
    (out / artifacts.MANIFEST).write_text(json.dumps({**manifest, "version": "0.0.1"}))
    assert check_stage(out, "align")["version"] == "0.0.1"
    monkeypatch.setitem(artifacts.SCHEMAS, "align", artifacts.SCHEMAS["align"] + 1)
    with pytest.raises(ArtifactError, match="rerun its stage"):
        check_stage(out, "align")


@pytest.mark.parametrize("out", ["adapter/transfer", "adapter", "."])
def test_an_output_overlapping_an_input_is_refused(tmp_path, out):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ArtifactError, match="overlaps the input"):
        write_stage(tmp_path / out, "transfer", inputs=hash_inputs({"adapter": str(adapter)}))
    assert sorted(tmp_path.rglob("*")) == before


def test_the_lock_is_reentrant_and_leaves_no_file(tmp_path):
    out = tmp_path / "out"
    with output_lock(out):
        assert (tmp_path / "out.lock").read_text().strip().isdigit()
        write_stage(out)  # a runner holds the lock around its stage_output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_lock_left_by_a_killed_process_is_taken_over_with_one_line(tmp_path, caplog):
    out = tmp_path / "out"
    holder = lock_holder(out)
    with pytest.raises(ArtifactError, match=f"another loramigrate process is writing .* \\(pid {holder.pid}\\)"):
        write_stage(out)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "out.lock").read_text().strip() == str(holder.pid)  # kill -9 runs no cleanup
    with caplog.at_level(logging.WARNING, logger="loramigrate.artifacts"):
        write_stage(out)
    assert [r.getMessage() for r in caplog.records] == [
        f"taking over {tmp_path / 'out.lock'}, left by process {holder.pid}, which is gone"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_lock_still_held_by_a_child_of_a_dead_writer_is_named_as_such(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    # what a child inheriting the descriptor (a forked worker) holds after its parent was killed
    child = subprocess.Popen([sys.executable, "-c", INHERITED_LOCK, str(tmp_path / "out.lock"), str(dead.pid)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(ArtifactError, match=f"still held by a child of process {dead.pid}, which died"):
            write_stage(tmp_path / "out")
    finally:
        child.kill()
        child.wait()


INHERITED_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, sys.argv[2].encode())
print("locked", flush=True)
time.sleep(600)
"""


def test_no_stage_publishes_an_adapter_holding_nan_or_inf(tmp_path):
    adapter = LoraAdapter(config={"peft_type": "LORA"}, modules={
        "layers.0.q_proj": LoraModule(a=torch.ones(2, 4), b=torch.full((4, 2), float("inf")), alpha=8.0)})
    with pytest.raises(ArtifactError, match="the transfer stage computed NaN or inf values .*q_proj.lora_B"):
        with stage_output(tmp_path / "out", "transfer", LOAD, {}) as run:
            write_adapter(adapter, run.tmp_dir)
    assert list(tmp_path.iterdir()) == []
