"""Head matching recovers known permutations and copes with shape changes."""

import copy
import dataclasses

import pytest
import torch

from loramigrate.align.head_match import (
    assign_hungarian,
    head_similarity,
    head_space_maps,
    rope_dim_map,
)
from loramigrate.arch import layer_weights, model_spec
from tests.helpers import build, permute_and_rotate, randomize_norms, tiny_config
from tests.reshapes import grow_head_dim, pair_rotations, rope_embedding, rotate_rotary_pairs


def permuted_pair(layers: int, seed: int, spread: float | None = 0.5):
    """Old tiny Llama (norm scales spread when given) and a permuted, rotated, norm-folded copy."""
    old = build(tiny_config("llama", hidden=64, layers=layers, heads=8, kv_heads=2, intermediate=96, init=0.2))
    if spread:
        randomize_norms(old, spread=spread)
    new = copy.deepcopy(old)
    truth = permute_and_rotate(new, seed=seed)
    return old, new, truth, model_spec(old), model_spec(new)


def test_permuted_rotated_heads_are_recovered_exactly():
    old, new, truth, so, sn = permuted_pair(layers=2, seed=5)
    for layer in range(2):
        sim = head_similarity(layer_weights(old, so, layer), layer_weights(new, sn, layer), truth.rotation)
        assert assign_hungarian(sim) == truth.head_map
        assert torch.allclose(sim[torch.arange(8), torch.tensor(truth.head_map)], torch.ones(8), atol=1e-4)


def test_sketched_circuits_still_recover_a_clear_permutation():
    old, new, truth, so, sn = permuted_pair(layers=1, seed=7, spread=None)
    sim = head_similarity(layer_weights(old, so, 0), layer_weights(new, sn, 0), truth.rotation, sketch=32)
    assert assign_hungarian(sim) == truth.head_map


def test_without_norm_folding_the_circuits_no_longer_match():
    old, new, truth, so, sn = permuted_pair(layers=1, seed=5, spread=2.0)
    sim = head_similarity(layer_weights(old, so, 0, fold_norms=False), layer_weights(new, sn, 0), truth.rotation)
    assert sim[torch.arange(8), torch.tensor(truth.head_map)].min() < 0.999


@pytest.mark.parametrize(("old_kw", "new_kw"), [
    (dict(heads=4, kv_heads=4), dict(heads=8, kv_heads=2)),   # MHA → GQA, heads up
    (dict(heads=8, kv_heads=2), dict(heads=4, kv_heads=4)),   # GQA → MHA, heads down
    (dict(heads=4, kv_heads=2), dict(heads=4, kv_heads=2, head_dim=16, hidden=48)),  # head dim + hidden change
])
def test_shape_changes_give_valid_one_to_one_maps(old_kw, new_kw):
    old = build(tiny_config("llama", **{"hidden": 32, **old_kw}))
    new = build(tiny_config("llama", **{"hidden": 32, **new_kw}), seed=1)
    so, sn = model_spec(old), model_spec(new)
    t = torch.linalg.qr(torch.randn(sn.hidden, so.hidden))[0]
    sim = head_similarity(layer_weights(old, so, 0), layer_weights(new, sn, 0), t)
    assert sim.shape == (sn.n_heads, so.n_heads) and torch.isfinite(sim).all()
    mapping = assign_hungarian(sim)
    sources = [h for h in mapping if h is not None]
    assert len(sources) == min(so.n_heads, sn.n_heads) == len(set(sources))


def test_rope_dim_map_keeps_pairs_and_frequencies():
    assert torch.equal(rope_dim_map(8, 8, 8, 8, 1e4, 1e4), torch.eye(8))
    m = rope_dim_map(64, 128, 64, 128, 1e6, 1e6)  # Qwen2.5-Coder 0.5B → 1.5B
    for i in range(32):
        assert m[2 * i, i] == 1 and m[2 * i + 64, i + 32] == 1
    assert m.sum() == 64 and m.sum(0).max() == 1 and m.sum(1).max() == 1
    shrink = rope_dim_map(128, 64, 128, 64, 1e6, 1e6)
    assert torch.equal(shrink, m.T)


def test_head_space_maps_are_identity_on_a_function_preserving_upgrade():
    old, new, truth, so, sn = permuted_pair(layers=1, seed=2)
    maps = head_space_maps(layer_weights(old, so, 0), layer_weights(new, sn, 0), truth.rotation, truth.head_map, so, sn)
    for role in ("q", "k", "v"):
        assert torch.allclose(maps[role], torch.eye(8).expand(8, 8, 8), atol=1e-4), role


def test_rotary_head_space_maps_carry_old_heads_onto_a_doubled_head_dim():
    """q/k through rotary pairs i → 2i (q also scaled by √2 against the 1/√head_dim), v through a random
    embedding per head: only maps that follow the pairs and the head map send old weights onto new ones."""
    old = build(tiny_config("llama", hidden=64, layers=1, heads=8, kv_heads=4, init=0.2))
    new = grow_head_dim(old, 2, seed=3)
    so, sn = model_spec(old), model_spec(new)
    wo, wn = layer_weights(old, so, 0), layer_weights(new, sn, 0)
    maps = head_space_maps(wo, wn, torch.eye(64), list(range(8)), so, sn)
    kv = torch.arange(8) // so.group_size
    assert torch.allclose(2**0.5 * maps["q"] @ wo.q, wn.q, atol=1e-5)
    assert torch.allclose(maps["k"] @ wo.k[kv], wn.k[kv], atol=1e-5)
    assert torch.allclose(maps["v"] @ wo.v[kv], wn.v[kv], atol=1e-4)


def test_head_space_maps_without_rotary_embeddings_recover_per_head_rotations():
    """BERT has no rotary embeddings, so q/k maps are fitted: a shared rotation of each head's q and k
    (scores unchanged) and another of its v must come back."""
    model = build(tiny_config("bert", init=0.2))
    spec = model_spec(model)
    old = layer_weights(model, spec, 0)
    g = torch.Generator().manual_seed(0)
    qk, v = torch.linalg.qr(torch.randn(2, spec.n_heads, spec.head_dim, spec.head_dim, generator=g))[0]
    new = dataclasses.replace(old, q=qk @ old.q, k=qk @ old.k, v=v @ old.v)
    maps = head_space_maps(old, new, torch.eye(spec.hidden), list(range(spec.n_heads)), spec, spec)
    assert spec.rope_theta is None
    assert torch.allclose(maps["q"], qk, atol=1e-4) and torch.allclose(maps["k"], qk, atol=1e-4)
    assert torch.allclose(maps["v"], v, atol=1e-4)



@pytest.mark.parametrize("factor", [1, 2], ids=["same-head-dim", "head-dim-doubled"])
def test_rotary_pair_rotations_are_fitted_to_the_known_angles(factor):
    """q and k of each kv group rotated per rotary pair by known angles (tests/reshapes.py): the q/k maps must be
    exactly those rotations (after the pair embedding i → factor·i), one per kv group, in every layer."""
    old = build(tiny_config("llama", hidden=64, layers=2, heads=8, kv_heads=4, init=0.2))
    randomize_norms(old)
    new, angles = rotate_rotary_pairs(grow_head_dim(old, factor), seed=4)
    so, sn = model_spec(old), model_spec(new)
    kv = torch.arange(8) // sn.group_size
    for layer in range(2):
        maps = head_space_maps(layer_weights(old, so, layer), layer_weights(new, sn, layer), torch.eye(64),
                               list(range(8)), so, sn)
        want = pair_rotations(angles[layer])[kv] @ rope_embedding(so.head_dim, factor)
        assert torch.allclose(maps["q"], want, atol=1e-5) and torch.allclose(maps["k"], want, atol=1e-5)
        fitted = torch.atan2(maps["q"][:, sn.head_dim // 2, 0], maps["q"][:, 0, 0])  # pair 0's angle per head
        assert torch.allclose(fitted, angles[layer, kv, 0], atol=1e-5)
