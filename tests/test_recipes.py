"""Every shipped recipe loads into the typed stage configs; overrides and bad keys behave."""

from pathlib import Path

import pytest

from loramigrate.align.layer_map import LAYER_MAPPERS
from loramigrate.errors import ConfigError
from loramigrate.recipes import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").rglob("*.yaml"))
MINIMAL = "name: x\nold: a\nnew: b\nadapters: [c]\ndata: {train: t, val: v, test: s}\n"


def test_there_are_recipes():
    assert len(RECIPES) >= 2


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_is_valid(path, monkeypatch):
    monkeypatch.setenv("LORAMIGRATE_CACHE", "/cache")
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", "/debug")
    recipe = load_recipe(path)
    assert recipe.align_config().layer_map in LAYER_MAPPERS
    assert recipe.old.startswith(("/cache/models/", "/debug/")) and recipe.adapters
    assert recipe.finetune_config("INIT", "ADAPTER").data == recipe.data.train


@pytest.mark.parametrize(("body", "match"), [
    (MINIMAL + "align: {layer_mapp: cka_dp}\n", "align.layer_mapp"),
    (MINIMAL + "finetune: {stepz: 3}\n", "finetune.stepz"),
    (MINIMAL + "extra_section: 1\n", "extra_section"),
    ("name: x\nold: a\n", "new"),
])
def test_bad_recipes_name_the_field(tmp_path, body, match):
    bad = tmp_path / "r.yaml"
    bad.write_text(body)
    with pytest.raises(ConfigError, match=match):
        load_recipe(bad)


def test_overrides_reach_the_stage_configs(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    recipe = load_recipe(path, ["finetune.steps=7", "search.n_trials=3", "align.max_tokens=64", "search=null"])
    assert recipe.finetune_config("i", "a").steps == 7 and recipe.align_config().max_tokens == 64 and recipe.search is None
    with pytest.raises(ConfigError, match="STAGE.KEY=VALUE"):
        load_recipe(path, ["finetune.steps"])


@pytest.mark.parametrize(("section", "field", "value"), [("{fidelity_steps: 3}", "train", "t"),
                                                         ("{objective: distill}", "teacher_adapter", "S")])
def test_search_takes_what_its_objective_needs_from_the_recipe(tmp_path, section, field, value):
    """The multi-fidelity objective trains on the recipe's data; distill is taught by the adapter being migrated."""
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL + f"search: {section}\n")
    assert getattr(load_recipe(path).search_config("A", "T", "S"), field) == value
    path.write_text(MINIMAL)
    assert getattr(load_recipe(path).search_config("A", "T", "S"), field) is None


def test_paths_expand_the_cache_default_and_refuse_unset_variables(tmp_path, monkeypatch):
    monkeypatch.delenv("LORAMIGRATE_CACHE", raising=False)
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL.replace("old: a", "old: ${LORAMIGRATE_CACHE}/models/a"))
    assert load_recipe(path).old == str(Path.home() / ".cache" / "loramigrate" / "models" / "a")
    path.write_text(MINIMAL.replace("old: a", "old: $NOT_SET_ANYWHERE/a"))
    with pytest.raises(ConfigError, match="NOT_SET_ANYWHERE, which is not set"):
        load_recipe(path)
