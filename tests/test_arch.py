"""ModelSpec introspection for each family, from config and module names."""

import pytest
import torch
import transformers

from loramigrate.arch import layer_weights, model_spec, norm_scale
from loramigrate.errors import UnsupportedArchitectureError
from tests.helpers import FAMILIES, build, tiny_config


@pytest.mark.parametrize("family", FAMILIES)
def test_spec_of_every_family(family):
    model = build(tiny_config(family, hidden=32, heads=4, kv_heads=2, layers=3, intermediate=48))
    spec = model_spec(model)
    assert (spec.n_layers, spec.hidden, spec.n_heads, spec.head_dim, spec.intermediate) == (3, 32, 4, 8, 48)
    assert spec.n_kv_heads == (2 if family in ("llama", "qwen2", "mistral", "gemma") else 4)
    assert spec.fused_qkv == (family == "neox")
    assert spec.gated_mlp == (family not in ("neox", "bert"))
    assert bool(spec.norms) == (family != "bert")
    w = layer_weights(model, spec, 2)
    assert w.q.shape == (4, 8, 32) and w.k.shape == (spec.n_kv_heads, 8, 32) and w.o.shape == (4, 8, 32)
    assert w.up.shape == (48, 32) and w.down.shape == (32, 48)
    for role in ("q", "k", "v", "o", "up", "down"):
        assert model.get_submodule(spec.module_name(0, role)) is not None


def test_head_dim_from_config_not_hidden_over_heads():
    spec = model_spec(build(tiny_config("llama", hidden=32, heads=4, kv_heads=2, head_dim=16)))
    assert spec.head_dim == 16


def test_fused_qkv_split_follows_neox_layout():
    model = build(tiny_config("neox", hidden=32, heads=4))
    spec = model_spec(model)
    fused = model.get_submodule(spec.module_name(0, "q")).weight.detach()
    w = layer_weights(model, spec, 0, fold_norms=False)
    assert torch.equal(w.k[1], fused.view(4, 3, 8, 32)[1, 1])


def test_norm_scale_probe_handles_layernorm_rmsnorm_and_gemma():
    ln = torch.nn.LayerNorm(6)
    with torch.no_grad():
        ln.weight.copy_(torch.arange(6.0))
        ln.bias.fill_(3.0)
    assert torch.allclose(norm_scale(ln, 6), torch.arange(6.0), atol=1e-5)
    gemma = build(tiny_config("gemma"))
    norm = gemma.model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.fill_(0.5)
    assert torch.allclose(norm_scale(norm, 32), torch.full((32,), 1.5), atol=1e-4)  # Gemma scales by 1 + w


def test_unsupported_architecture_names_what_is_missing():
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50)
    model = transformers.GPT2LMHeadModel(cfg)  # Conv1D projections, not supported
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        model_spec(model)
