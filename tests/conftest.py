"""Session fixtures: tiny model directories with known relationships, built once per test session."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    FAMILIES,
    WORDS,
    build,
    insert_layers,
    make_tiny,
    make_tokenizer,
    permute_and_rotate,
    randomize_norms,
    save,
    tiny_config,
)

CACHE = Path(os.environ.get("LORAMIGRATE_CACHE", Path.home() / ".cache" / "loramigrate"))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {fam: make_tiny(fam, root / fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def known_upgrade(tmp_path_factory):
    """(old dir, new dir, Upgrade): heads, kv groups and neurons permuted, residual rotated.

    The old model has non-unit norm scales and strong weights, so layers are distinguishable and
    the alignment must fold norms to recover the permutation.
    """
    root = tmp_path_factory.mktemp("upgrade")
    old = build(tiny_config("llama", hidden=64, layers=4, heads=8, kv_heads=4, intermediate=96, init=0.2))
    randomize_norms(old)
    new = copy.deepcopy(old)
    truth = permute_and_rotate(new, seed=3)
    tok = make_tokenizer(WORDS)
    return save(old, tok, root / "old"), save(new, tok, root / "new"), truth


@pytest.fixture(scope="session")
def deeper_upgrade(tmp_path_factory):
    """(old dir, new dir, layer_map): two new random blocks inserted into a 4-layer model."""
    root = tmp_path_factory.mktemp("deeper")
    old = build(tiny_config("llama", hidden=64, layers=4, heads=8, kv_heads=4, intermediate=96, init=0.2))
    new, order = insert_layers(old, [1, 3])
    tok = make_tokenizer(WORDS)
    return save(old, tok, root / "old"), save(new, tok, root / "new"), order


def shape_pair(root: Path, old_kw: dict, new_kw: dict, family: str = "llama") -> tuple[Path, Path]:
    """Two unrelated tiny models of the given shapes (head/kv/hidden/layer counts)."""
    return (make_tiny(family, root / "old", seed=0, **old_kw), make_tiny(family, root / "new", seed=1, **new_kw))


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
