"""Every stage in bfloat16, per device: the CPU (default suite: torch runs bf16 there, which catches most dtype
errors) and CUDA (`pytest -m gpu`, skipped without a GPU), as mergekit parametrises its dtype/device tests.

One `loramigrate run` of the debug recipe per device, with the options that exercise the most device and dtype
code (activation-based head and neuron matching, per-layer transfers, the data-aware fit, the base evolution and the
multi-fidelity search, RefLoRA, ReLoRA restarts, gradient checkpointing); each stage's test checks its own output,
and a run killed in finetune resumes to the same adapter.
"""

import json
import shutil

import pytest
import torch

from loramigrate.adapters import read_adapter
from loramigrate.alignment import load_alignment
from tests.test_run import build_debug, factors, kill_in, run

DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]
EVERYTHING = ["--set", "align.head_similarity=activations", "--set", "align.mlp_similarity=activations",
              "--set", "align.per_layer_transfer=true", "--set", "search.beta_max=1", "--set", "search.fidelity_steps=1",
              "--set", "finetune.rebalance=full", "--set", "finetune.restart_every=3",
              "--set", "finetune.grad_checkpointing=true"]


def bf16_run(out, device, *extra):
    return run(out, "--dtype", "bfloat16", "--device", device, *EVERYTHING, *extra)


@pytest.fixture(scope="module", params=DEVICES)
def migrated(request, tmp_path_factory):
    """(device, models, run directory) of one uninterrupted bf16 run."""
    device = request.param
    models = build_debug(tmp_path_factory.mktemp(f"debug-{device}"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAMIGRATE_DEBUG_MODELS", str(models))
        out = tmp_path_factory.mktemp(f"bf16-{device}") / "run"
        result = bf16_run(out, device)
        assert result.exit_code == 0, result.output
    return device, models, out


def manifest(migrated, stage: str) -> dict:
    """The stage's manifest, checked for what every stage records: the run's dtype and device, and peak GPU memory
    exactly where a GPU was used."""
    device, _, out = migrated
    m = json.loads((out / ("align" if stage == "align" else f"water/{stage}") / "manifest.json").read_text())
    assert m["runtime"] == {"dtype": "bfloat16", "device": device}
    assert (m["peak_gpu_mb"] is None) == (device == "cpu") and (m["peak_gpu_mb"] or 1) > 0
    return m


def fp32_and_finite(adapter_dir) -> None:
    adapter = read_adapter(adapter_dir)
    for m in adapter.modules.values():
        assert m.a.dtype == m.b.dtype == torch.float32 and torch.isfinite(m.a).all() and torch.isfinite(m.b).all()
        assert float((m.b @ m.a).norm()) > 0


def test_align(migrated):
    manifest(migrated, "align")
    alignment = load_alignment(migrated[2] / "align")
    assert torch.isfinite(alignment.cka).all() and alignment.cka.device.type == "cpu"
    assert all(la.transfer is not None and torch.isfinite(la.head_sim).all() for la in alignment.layers.values())


def test_transfer(migrated):
    manifest(migrated, "transfer")
    fp32_and_finite(migrated[2] / "water" / "transfer")
    report = json.loads((migrated[2] / "water" / "transfer" / "transfer_report.json").read_text())
    assert all(row.get("effect_r2_after", 0) >= row.get("effect_r2_before", 0) for row in report["data_aware"]["layers"])


def test_search(migrated):
    search = manifest(migrated, "search")["search"]
    assert search["trials"] == 3 and search["space"]["beta.attn.early"] == [-1.0, 1.0]
    assert list((migrated[2] / "align" / "cache").glob("evolution-*.safetensors"))  # both bases were loaded
    fp32_and_finite(migrated[2] / "water" / "search")


def test_finetune(migrated):
    m = manifest(migrated, "finetune")
    assert m["config"]["grad_checkpointing"] and m["config"]["load"]["dtype"] == "bfloat16"
    fp32_and_finite(migrated[2] / "water" / "finetune")
    log = [json.loads(line) for line in (migrated[2] / "water" / "finetune" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 6 and all(torch.isfinite(torch.tensor(r["loss"])) for r in log)


def test_eval(migrated):
    manifest(migrated, "eval")
    rows = json.loads((migrated[2] / "water" / "eval" / "results.json").read_text())["results"]
    scored = [r for r in rows if "loss" in r]
    assert len(scored) >= 5 and all(torch.isfinite(torch.tensor(r["loss"])) for r in scored)


def test_run_killed_in_finetune_resumes_to_the_same_adapter(migrated, tmp_path, monkeypatch):
    device, models, whole = migrated
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(models))
    shutil.copytree(whole, tmp_path / "run")
    revive = kill_in(monkeypatch, "finetune")
    assert bf16_run(tmp_path / "run", device, "--from", "finetune").exit_code != 0
    assert list((tmp_path / "run" / "water").glob("finetune.ckpt-*"))  # killed after its first checkpoint
    revive()
    result = bf16_run(tmp_path / "run", device)
    assert result.exit_code == 0, result.output
    resumed = factors(tmp_path / "run" / "water" / "finetune")
    for name, (b, a) in factors(whole / "water" / "finetune").items():
        assert torch.allclose(b @ a, resumed[name][0] @ resumed[name][1], atol=1e-5), name
