"""The mixed-precision and device policy: dtype auto, fp16 refused for training, fp32 trainable weights over a
bf16 base, a dtype-aware reload check, and peak GPU memory in manifests. Runs on CPU: CUDA is faked where only
its answers matter (``pytest tests/test_precision.py``)."""

import json
import logging
import os

import pytest
import torch
from pydantic import ValidationError
from typer.testing import CliRunner

from loramigrate import artifacts, models
from loramigrate.adapters import read_adapter
from loramigrate.align.activation_stats import HeadOutputStats, captured_inputs
from loramigrate.align.cka import FeatureCKA
from loramigrate.align.transfer_matrix import TransferStats
from loramigrate.artifacts import stage_output
from loramigrate.cli.main import app
from loramigrate.config import FinetuneConfig, ModelLoadConfig, SearchConfig, TransferConfig
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.transfer.runner import verify_with_peft
from tests.helpers import make_lora

runner = CliRunner()
CPU_BF16 = {"dtype": "bfloat16", "device": "cpu"}


@pytest.fixture()
def cuda_without_bf16(monkeypatch):
    models._warn_no_bf16.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")


def test_auto_takes_bf16_only_on_a_cuda_device_that_supports_it(cuda_without_bf16, monkeypatch, caplog):
    cuda = torch.device("cuda")
    with caplog.at_level(logging.WARNING):
        assert models.resolve_dtype("auto", cuda) == torch.float32
        assert models.resolve_dtype("auto", cuda) == torch.float32
    assert [r.message for r in caplog.records] == ["Tesla V100 does not support bfloat16; dtype auto uses float32 "
                                                   "(twice the memory)"]  # one line, however many loads
    with pytest.raises(ConfigError, match="Tesla V100 does not support it"):
        models.resolve_dtype("bfloat16", cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert models.resolve_dtype("auto", cuda) == torch.bfloat16
    assert models.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert models.resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_float16_is_refused_wherever_loramigrate_trains(tiny_models, tmp_path):
    fp16 = {"load": {"dtype": "float16"}}
    with pytest.raises(ValidationError, match="float16 training needs loss scaling"):
        FinetuneConfig(base="b", data="d", **fp16)
    with pytest.raises(ValidationError, match="multi-fidelity objective trains"):
        SearchConfig(align="a", transfer="t", data="d", fidelity_steps=2, train="d", **fp16)
    with pytest.raises(ValidationError, match="data-aware block fit trains"):
        TransferConfig(align="a", adapter="x", prompts="p", **fp16)
    # forward passes only: allowed
    SearchConfig(align="a", transfer="t", data="d", **fp16)
    TransferConfig(align="a", adapter="x", prompts="p", fit_solver="rrr", **fp16)
    result = runner.invoke(app, ["finetune", "--base", str(tiny_models["llama"]), "--data", "d.jsonl", "--dtype",
                                 "float16", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and "use load.dtype bfloat16" in result.stderr and "Traceback" not in result.output


def test_the_reload_check_allows_the_rounding_of_the_dtype_peft_holds(tiny_models, tmp_path, monkeypatch):
    """PEFT may hold the factors in the base's bf16 (``autocast_adapter_dtype=False``); a 1e-5 check then refused
    every correct adapter, while a changed weight must still fail."""
    import peft

    out = make_lora(tiny_models["llama"], tmp_path / "lora", targets=["q_proj", "v_proj"])
    real = peft.PeftModel.from_pretrained.__func__
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", classmethod(
        lambda cls, *a, **k: real(cls, *a, **k, autocast_adapter_dtype=False)))
    load = ModelLoadConfig(**CPU_BF16)
    verify_with_peft(out, str(tiny_models["llama"]), load, read_adapter(out))
    changed = read_adapter(out)
    next(iter(changed.modules.values())).a.mul_(1.05)
    with pytest.raises(ArtifactError, match="PEFT loaded other weights"):
        verify_with_peft(out, str(tiny_models["llama"]), load, changed)


def test_manifests_record_the_stage_peak_gpu_memory(tmp_path, monkeypatch):
    with stage_output(tmp_path / "cpu", "align", {"load": {}}, {}):
        pass
    assert json.loads((tmp_path / "cpu" / artifacts.MANIFEST).read_text())["peak_gpu_mb"] is None  # no CUDA here
    resets = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: 1536 * 2**20 + len(resets))
    with stage_output(tmp_path / "gpu", "align", {"load": {}}, {}):
        assert resets == [1]  # reset when the stage took its lock
    assert json.loads((tmp_path / "gpu" / artifacts.MANIFEST).read_text())["peak_gpu_mb"] == 1536.0


def test_the_accumulators_live_where_the_activations_do():
    """On the meta device, where a CPU buffer cannot join, as a CUDA activation could not join one."""
    meta = {"device": "meta"}
    cka = FeatureCKA(2, 8, 3, 6, **meta)
    cka.update(torch.empty(2, 10, 8, **meta), torch.empty(3, 10, 6, **meta))
    stats = TransferStats(8, 6, **meta)
    stats.update(torch.empty(10, 8, **meta), torch.empty(10, 6, **meta))
    heads = HeadOutputStats(2, 4, 3, 2, **meta)
    heads.update(torch.empty(10, 8, **meta), torch.empty(10, 6, **meta))
    assert {t.device.type for t in (cka.xy, stats.ytx, stats.yty, heads.cross, heads.self_new)} == {"meta"}


def test_capture_hooks_keep_activations_as_the_model_computed_them(tiny_models):
    """No copy to the host (nor to float32) inside a hook: the accumulators convert, on the device."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.bfloat16)
    name = "model.layers.0.self_attn.o_proj"
    with captured_inputs(model, [name]) as got, torch.no_grad():
        model(torch.tensor([[2, 3, 4]]))
    assert got[name].dtype == torch.bfloat16 and got[name].shape == (1, 3, 32)


def test_the_base_evolution_loads_both_bases_on_the_host_in_the_runs_dtype(monkeypatch):
    """dtype auto on a bf16 GPU means bf16 for the two bases held on the host too, not float32 (56 GB for a 7B pair)."""
    from types import SimpleNamespace

    from loramigrate.search import runner as search_runner

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    loads = []
    monkeypatch.setattr(search_runner, "resolve_model", lambda path: path)
    monkeypatch.setattr(search_runner, "load_model", lambda ref, dtype, device, **placement: loads.append(
        (ref, dtype, device)))
    monkeypatch.setattr(search_runner, "base_evolution", lambda *args, **kwargs: args[4]())  # its load_models()
    cfg = SearchConfig(align="a", transfer="t", data="d", load={"device": "cuda"})
    search_runner._evolution(cfg, SimpleNamespace(base=lambda side: side), {}, lambda *a: None)
    assert loads == [("old", "bfloat16", "cpu"), ("new", "bfloat16", "cpu")]


def test_cuda_runs_are_set_up_to_repeat_themselves(monkeypatch):
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.delenv("LORAMIGRATE_TF32", raising=False)
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = cudnn.benchmark = True
        models.cuda_determinism()
        assert not (matmul.allow_tf32 or cudnn.allow_tf32 or cudnn.benchmark)
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("LORAMIGRATE_TF32", "1")  # asked for
        models.cuda_determinism()
        assert matmul.allow_tf32 and cudnn.allow_tf32
    finally:
        matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = before[:3]
        torch.use_deterministic_algorithms(before[3], warn_only=before[4])
