"""Every shipped recipe loads into the typed configs and names only registered methods."""

from pathlib import Path

import pytest

from loramigrate.align.layer_map import LAYER_MAPPERS
from loramigrate.errors import ConfigError
from loramigrate.recipes import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path, monkeypatch):
    monkeypatch.setenv("LORAMIGRATE_CACHE", "/cache")
    recipe = load_recipe(path)
    assert recipe.align.layer_map in LAYER_MAPPERS
    assert recipe.align.old.startswith("/cache/models/")


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nalign: {old: a, new: b, layer_mapp: cka_dp}\n")
    with pytest.raises(ConfigError, match="layer_mapp"):
        load_recipe(bad)
