"""`run` checks every input before its first stage (pipeline.check_inputs): nothing is written when one is missing,
and a missing adapter's message carries the recipe's command that trains it."""

import pytest
from typer.testing import CliRunner

from loramigrate.cli.main import app
from tests.test_run import RECIPE, build_debug

runner = CliRunner()
TRAIN = "loramigrate finetune --base old --data train.jsonl -o adapters/water"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return build_debug(tmp_path_factory.mktemp("debug"))


@pytest.mark.parametrize(("override", "message"), [
    (["--adapter", "{root}/adapters/missing"], "not a PEFT adapter directory"),
    (["--set", "old={root}/nowhere"], "not found"),
    (["--set", "data.val={root}/missing.jsonl"], "cannot read data file"),
    (["--set", "data.train={root}/missing.jsonl"], "cannot read data file"),
    (["--set", "align.calib={root}/missing.txt"], "cannot read calibration file"),
    (["--set", "transfer.prompts={root}/missing.jsonl"], "cannot read data file"),
])
def test_a_missing_input_stops_run_before_its_first_stage(models, tmp_path, monkeypatch, override, message):
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(models))
    out = tmp_path / "run"
    result = runner.invoke(app, ["-q", "run", str(RECIPE), "-o", str(out), *(o.format(root=models) for o in override)])
    assert result.exit_code == 1, result.output
    assert message in result.stderr
    assert not out.exists()


def test_a_missing_adapter_names_the_command_that_trains_it(models, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIGRATE_DEBUG_MODELS", str(models))
    result = runner.invoke(app, ["-q", "run", str(RECIPE), "-o", str(tmp_path / "run"), "--adapter",
                                 str(models / "adapters" / "missing"), "--set", f"make_adapter={TRAIN}"])
    assert result.exit_code == 1
    assert f"the recipe trains it with: {TRAIN}" in " ".join(result.stderr.split())
