"""Device maps (``--device-map``, ``--max-memory``): the models a stage only reads are placed by accelerate over
the device, CPU memory and disk, and every artifact equals that of the same run with each model whole on the
device. On the CPU (default suite) part of every model goes to disk; on CUDA (`pytest -m gpu`) the budget splits
them over the GPU, CPU memory and disk.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from loramigrate.arch import weight_of
from loramigrate.config import ModelLoadConfig
from loramigrate.models import attach_adapter, input_device, load_frozen, load_model, offloaded, resolve_model
from tests.test_devices import DEVICES
from tests.test_run import build_debug, run

# the options that read the most models and weights: activation matching, per-layer transfers, the data-aware fit
# (the old pair), the base evolution (both bases), the multi-fidelity search, a teacher, the proxy ensemble in eval
OPTIONS = ["--dtype", "float32", "--set", "align.head_similarity=activations",
           "--set", "align.mlp_similarity=activations", "--set", "align.per_layer_transfer=true",
           "--set", "search.beta_max=1", "--set", "search.fidelity_steps=1", "--set", "finetune.teacher=old"]
# the tiny models hold 100-180 KB: this keeps their embeddings in memory and puts the blocks on disk
BUDGET = {"cpu": "cpu=60KB", "cuda": "0=60KB,cpu=40KB"}


@pytest.fixture(scope="module", params=DEVICES)
def placed_and_whole(request, tmp_path_factory):
    """(models, run with device maps, run with whole models) on one device."""
    device = request.param
    models = build_debug(tmp_path_factory.mktemp(f"debug-{device}"))
    runs = tmp_path_factory.mktemp(f"map-{device}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORAMIGRATE_DEBUG_MODELS", str(models))
        for name, extra in (("whole", []), ("placed", ["--device-map", "auto", "--max-memory", BUDGET[device]])):
            result = run(runs / name, "--device", device, *OPTIONS, *extra)
            assert result.exit_code == 0, result.output
    return device, models, runs / "placed", runs / "whole"


def test_every_artifact_equals_the_whole_models_run(placed_and_whole):
    device, _, placed, whole = placed_and_whole
    tensors = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert any("evolution" in p.name for p in tensors)  # both bases were read for the base evolution
    for rel in tensors:
        a, b = load_file(str(whole / rel)), load_file(str(placed / rel))
        assert a.keys() == b.keys(), rel
        for key in a:  # the same computation: bit-identical on the CPU, within kernel noise on CUDA
            assert torch.allclose(a[key].float(), b[key].float(), atol=0 if device == "cpu" else 1e-4), (rel, key)
    results = [json.loads((run_dir / "water" / "eval" / "results.json").read_text())["results"]
               for run_dir in (whole, placed)]
    assert [r.get("score") for r in results[0]] == [r.get("score") for r in results[1]]
    config = json.loads((placed / "water" / "finetune" / "manifest.json").read_text())["config"]
    assert config["load"]["device_map"] == "auto" and config["teacher"] == "old"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_debug(tmp_path_factory.mktemp("debug-unit"))


def test_an_offloaded_model_reads_and_adapts_like_the_whole_one(tiny, tmp_path, monkeypatch):
    """The load really puts blocks on disk (so the run above is no vacuous comparison); their weights read
    through ``weight_of``, and an adapter attached by stock PEFT gives the whole pair's logits. PEFT's copies of
    the offloaded weights stay in the offload folder, not in the working directory."""
    monkeypatch.chdir(tmp_path)
    ref = resolve_model(str(tiny / "old"))
    whole = load_model(ref, "float32", "cpu")
    placed = load_frozen(ref, ModelLoadConfig(device="cpu", device_map="auto", max_memory=BUDGET["cpu"]))
    assert "disk" in placed.hf_device_map.values() and offloaded(placed)
    assert input_device(placed).type == "cpu"
    q = placed.model.layers[1].self_attn.q_proj
    assert q.weight.device.type == "meta"  # offloaded between forward passes
    assert torch.equal(weight_of(q), whole.model.layers[1].self_attn.q_proj.weight)
    x = torch.tensor([[1, 2, 3, 4, 5]])
    pair_whole = attach_adapter(whole, tiny / "adapters" / "water")
    pair_placed = attach_adapter(placed, tiny / "adapters" / "water")
    with torch.no_grad():
        expected = pair_whole(input_ids=x).logits
        assert torch.equal(pair_placed(input_ids=x).logits, expected)
        with pair_whole.disable_adapter():
            base_logits = pair_whole(input_ids=x).logits
    assert not torch.allclose(base_logits, expected)  # the adapter changes the logits: the check above has teeth
    assert not list(tmp_path.iterdir())


def test_a_cpu_run_keeps_a_device_map_off_the_gpus(tiny):
    """``--device cpu`` with a device map uses CPU memory and disk only, whatever GPUs the machine has."""
    ref = resolve_model(str(tiny / "new"))
    placed = load_frozen(ref, ModelLoadConfig(device="cpu", device_map="auto", max_memory="0=1GiB,cpu=60KB"))
    assert set(placed.hf_device_map.values()) <= {"cpu", "disk"}
