"""The stage commands' options come from the stage configs: every field has its option, with the config's
default and choices, the choices are the method registries' names, and --set reaches every field.

    pytest tests/test_cli.py
"""

from pathlib import Path
from typing import Literal, get_args, get_origin

import click
import pytest
import typer
import yaml
from typer.testing import CliRunner

from loramigrate.align.head_match import HEAD_MATCHERS
from loramigrate.align.layer_map import LAYER_MAPPERS
from loramigrate.align.mlp_map import MLP_MATCHERS
from loramigrate.align.transfer_matrix import TRANSFER_FITS
from loramigrate.cli.main import app
from loramigrate.config import AlignConfig, EvalConfig, FinetuneConfig, ModelLoadConfig, SearchConfig, TransferConfig
from loramigrate.errors import ConfigError
from loramigrate.finetune.regularise import SCHEDULES
from loramigrate.finetune.teacher import TEACHERS
from loramigrate.recipes import STAGES, load_recipe
from loramigrate.search.core import SCORES
from loramigrate.transfer.data_aware import SOLVERS

runner = CliRunner()
COMMANDS = {"align": AlignConfig, "transfer": TransferConfig, "search": SearchConfig, "finetune": FinetuneConfig,
            "eval": EvalConfig}
RUNNERS = {"align": "loramigrate.align.run_align", "transfer": "loramigrate.transfer.run_transfer",
           "search": "loramigrate.search.run_search", "finetune": "loramigrate.finetune.runner.run_finetune"}
REQUIRED = {"align": ["--old", "o", "--new", "n", "-o", "x"], "transfer": ["--align", "a", "--adapter", "p", "-o", "x"],
            "search": ["--align", "a", "--transfer", "t", "--data", "d", "-o", "x"],
            "finetune": ["--base", "b", "--data", "d", "-o", "x"], "eval": ["--base", "b", "--data", "d"]}
RECIPE = Path(__file__).parent.parent / "recipes" / "debug-tiny.yaml"


def options(command: str) -> dict[str, click.Parameter]:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


def fields(config) -> dict:
    """Every field of ``config``, nested configs flattened as the CLI flattens them."""
    out = {}
    for name, field in config.model_fields.items():
        out |= fields(field.annotation) if name == "load" else {name: field}
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_config_field_is_an_option_with_the_configs_default(command):
    opts = options(command)
    for name, field in fields(COMMANDS[command]).items():
        assert name in opts, f"{command}: {name} has no option"
        assert opts[name].opts[0] == "--" + name.replace("_", "-")
        assert opts[name].help == field.description
        assert opts[name].required if field.is_required() else opts[name].default == field.default, name
    assert "set_" in opts


REGISTRIES = [  # (config, field, names it takes besides the registry's, registry)
    (AlignConfig, "layer_map", set(), LAYER_MAPPERS),
    (AlignConfig, "head_match", set(), HEAD_MATCHERS),
    (AlignConfig, "mlp_match", {"auto"}, MLP_MATCHERS),
    (AlignConfig, "transfer", set(), TRANSFER_FITS),
    (TransferConfig, "fit_solver", set(), SOLVERS),
    (SearchConfig, "objective", set(), SCORES),
    (FinetuneConfig, "reg_schedule", set(), SCHEDULES),
    (FinetuneConfig, "teacher", {"none"}, TEACHERS),
]


@pytest.mark.parametrize(("config", "name", "extra", "registry"), REGISTRIES, ids=[r[1] for r in REGISTRIES])
def test_choices_are_the_registry_names(config, name, extra, registry):
    assert set(get_args(config.model_fields[name].annotation)) == extra | set(registry)


def test_the_lr_schedule_is_a_schedule():
    assert set(get_args(FinetuneConfig.model_fields["lr_schedule"].annotation)) <= set(SCHEDULES)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unknown_choice_is_refused_with_the_choices(command):
    name, field = next((n, f) for n, f in fields(COMMANDS[command]).items() if get_origin(f.annotation) is Literal)
    result = runner.invoke(app, [command, *REQUIRED[command], f"--{name.replace('_', '-')}", "bogus"])
    assert result.exit_code == 1 and "is not one of" in result.stderr, result.output
    assert all(repr(c) in result.stderr for c in get_args(field.annotation))


@pytest.fixture()
def captured(monkeypatch):
    """Patch each stage runner to record the config it is given."""
    got = {}

    def recorder(command):
        def run_stage(cfg, out, *args, **kwargs):
            got[command] = cfg
            return True
        return run_stage

    for command, target in RUNNERS.items():
        monkeypatch.setattr(target, recorder(command))
    return got


@pytest.mark.parametrize("command", list(RUNNERS))
def test_options_and_set_reach_the_config(captured, tmp_path, command):
    result = runner.invoke(app, [command, *REQUIRED[command], "--dtype", "float32", "--set", "load.device=cpu",
                                 "--set", "batch_size=3"])
    assert result.exit_code == 0, result.output
    cfg = captured[command]
    assert cfg.load == ModelLoadConfig(dtype="float32", device="cpu") and cfg.batch_size == 3
    assert result.stdout == "x\n"  # the output directory only


def test_new_align_options_and_list_fields(captured, tmp_path):
    assert runner.invoke(app, ["align", *REQUIRED["align"], "--ridge", "0.5", "--no-row-norm",
                               "--mlp-tokens", "64", "--cka-chunk", "16"]).exit_code == 0
    assert captured["align"].model_dump(include={"ridge", "row_norm", "mlp_tokens", "cka_chunk"}) == {
        "ridge": 0.5, "row_norm": False, "mlp_tokens": 64, "cka_chunk": 16}
    assert runner.invoke(app, ["finetune", *REQUIRED["finetune"], "--targets", "q_proj, v_proj"]
                         ).exit_code == 0
    assert captured["finetune"].targets == ["q_proj", "v_proj"]
    assert runner.invoke(app, ["transfer", *REQUIRED["transfer"], "--rank", "8"]).exit_code == 0
    assert captured["transfer"].rank == 8


def test_set_names_an_unknown_key_and_the_known_ones_in_one_line(captured):
    result = runner.invoke(app, ["align", *REQUIRED["align"], "--set", "ridgee=1"])
    assert result.exit_code == 1 and "align" not in captured
    assert result.stderr.startswith("error: invalid configuration: unknown key `ridgee`; known keys: old, new, calib,")
    assert "ridge, " in result.stderr and "load.dtype, load.device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("key", "known"), [("finetune.bogus", "rank, alpha, targets, steps,"),
                                            ("finetune.base", "rank, alpha, targets, steps,"),  # run fills it in
                                            ("finetune.load.bogus", "dtype, device"),
                                            ("data.bogus", "train, val, test")])
def test_run_set_names_an_unknown_key_and_the_known_ones_in_one_line(monkeypatch, tmp_path, key, known):
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(tmp_path))
    result = runner.invoke(app, ["run", str(RECIPE), "-o", str(tmp_path / "o"), "--set", f"{key}=1"])
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.output
    assert f"unknown key `{key}`; known keys: {known}" in result.stderr, result.stderr


def helps() -> dict[str, str]:
    """Every command's --help as a user's 80-column terminal shows it; the app's own under ""."""
    return {name: runner.invoke(app, [*([name] if name else []), "--help"], env={"COLUMNS": "80"}).stdout
            for name in ["", *typer.main.get_command(app).commands]}


def test_no_flag_shows_a_value_placeholder():
    """A boolean option takes no value, so its help shows none (typer draws ``<bool>`` unless told)."""
    for name, text in helps().items():
        assert "--help" in text and "<bool>" not in text, name


def test_every_command_has_examples_that_read_whole():
    """Each example command fits on one line of the help: none wraps mid-command or continues after a ``\\``."""
    for name, command in typer.main.get_command(app).commands.items():
        examples = [ln.strip() for ln in (command.epilog or "").splitlines() if ln.strip().startswith("loramigrate")]
        assert examples and all(e.startswith(f"loramigrate {name}") for e in examples), name
        shown = [ln.strip() for ln in helps()[name].splitlines()]
        assert all(e in shown and not e.endswith("\\") for e in examples), name


def test_run_force_says_what_it_redoes():
    assert "Redo every stage" in helps()["run"] and "Redo the stage" not in helps()["run"]


def test_a_recipes_load_reaches_every_stage_and_run_options_override_it(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(tmp_path))
    raw = yaml.safe_load(RECIPE.read_text())
    raw["load"], raw["eval"]["load"] = {"device": "cpu"}, {"dtype": "float16"}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    recipe = load_recipe(tmp_path / "r.yaml")
    configs = {"align": recipe.align_config(), "transfer": recipe.transfer_config("a", "p"),
               "search": recipe.search_config("a", "t", "p"), "finetune": recipe.finetune_config("i", "p"),
               "eval": recipe.eval_config()}
    assert {s: (c.load.dtype, c.load.device) for s, c in configs.items()} == {
        **{s: ("auto", "cpu") for s in STAGES}, "eval": ("float16", "cpu")}  # a section's own load wins
    recipe = load_recipe(tmp_path / "r.yaml", ["search=null"], load={"dtype": "bfloat16"})  # run --dtype: over all
    assert recipe.search is None and recipe.eval_config().load.dtype == "bfloat16"
    assert recipe.align_config().load == recipe.finetune_config("i", "p").load == ModelLoadConfig(
        dtype="bfloat16", device="cpu")


def test_run_passes_its_load_options(monkeypatch, tmp_path):
    got = []

    def timed_run(recipe, *args):
        got.append(recipe)
        raise ConfigError("stop here")

    monkeypatch.setattr("loramigrate.pipeline.timed_run", timed_run)
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(tmp_path))
    assert runner.invoke(app, ["run", str(RECIPE), "-o", str(tmp_path / "o"), "--device", "cpu"]).exit_code == 1
    assert got[0].eval_config().load.device == "cpu" and got[0].align_config().load.dtype == "auto"
