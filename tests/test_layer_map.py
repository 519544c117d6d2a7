"""Layer mappers on similarity matrices with a known best path."""

import itertools

import pytest
import torch

from loramigrate.align.layer_map import LAYER_MAPPERS, map_cka_dp


def brute_force(sim: torch.Tensor) -> float:
    n_old, n_new = sim.shape
    short, long = min(n_old, n_new), max(n_old, n_new)
    best = float("-inf")
    for cols in itertools.combinations(range(long), short):
        pairs = zip(range(short), cols, strict=True)
        total = sum(float(sim[i, c] if n_old <= n_new else sim[c, i]) for i, c in pairs)
        best = max(best, total)
    return best


def path_score(sim, mapping):
    return sum(float(sim[i, j]) for j, i in enumerate(mapping) if i is not None)


@pytest.mark.parametrize("shape", [(3, 6), (6, 3), (4, 4), (5, 7), (7, 2)])
def test_dp_is_optimal_monotone_and_one_to_one(shape):
    sim = torch.rand(shape, generator=torch.Generator().manual_seed(sum(shape)))
    mapping = map_cka_dp(sim)
    assert len(mapping) == shape[1]
    sources = [i for i in mapping if i is not None]
    assert sources == sorted(set(sources))
    assert len(sources) == min(shape)
    assert path_score(sim, mapping) == pytest.approx(brute_force(sim))


def test_dp_finds_inserted_layers():
    truth = [0, None, 1, 2, None, 3]
    sim = torch.full((4, 6), 0.3)
    for j, i in enumerate(truth):
        if i is not None:
            sim[i, j] = 0.95
    sim[1, 1] = 0.9  # an inserted layer that resembles its neighbour must not steal the match
    assert map_cka_dp(sim) == truth


def test_dp_drops_removed_layers():
    sim = torch.full((5, 3), 0.2)
    for j, i in enumerate([0, 2, 4]):
        sim[i, j] = 0.9
    assert map_cka_dp(sim) == [0, 2, 4]


@pytest.mark.parametrize("name", sorted(LAYER_MAPPERS))
@pytest.mark.parametrize("shape", [(3, 6), (6, 3), (4, 4)])
def test_every_mapper_is_order_preserving_and_one_to_one(name, shape):
    mapping = LAYER_MAPPERS[name](torch.rand(shape))
    sources = [i for i in mapping if i is not None]
    assert len(mapping) == shape[1] and sources == sorted(set(sources))
    assert all(0 <= i < shape[0] for i in sources)


def test_identity_shapes_give_identity_for_all_mappers():
    for fn in LAYER_MAPPERS.values():
        assert fn(torch.eye(5)) == list(range(5))
