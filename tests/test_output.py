"""What the CLI writes where: results on stdout; progress, logs and library warnings on stderr, short and plain when
stderr is not a terminal.

    pytest tests/test_output.py
"""

import json
import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from loramigrate.cli import _ui
from loramigrate.cli.main import app
from tests.helpers import WORDS, make_lora, python_env

runner = CliRunner()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{w} {w}", "completion": " water"}) + "\n" for w in WORDS[:24]))
    return path


def test_progress_is_plain_log_lines_when_stderr_is_not_a_terminal(tiny_models, data, tmp_path, monkeypatch):
    monkeypatch.setattr(_ui, "PLAIN_EVERY_S", 0.0)  # a line at every step, as a long run gets one every 10 s
    out = tmp_path / "ft"
    result = runner.invoke(app, ["finetune", "--base", str(tiny_models["llama"]), "--data", str(data), "--steps", "5",
                                 "--eval-every", "5", "--batch-size", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    steps = re.findall(r"finetune (\d)/5 loss \d+\.\d{3}", result.stderr)
    assert steps == ["1", "2", "3", "4", "5"], result.stderr  # each step as it ends, not one bar at the end
    assert re.search(r"finetune 2/5 loss \S+ \([\d.]+ m?s/it, eta \d+ s\)", result.stderr), result.stderr
    assert "━" not in result.stderr  # no rich bar
    assert result.stdout == f"{out}\n"


def test_plain_progress_reports_every_interval_and_the_end(caplog):
    report = _ui.PlainProgress(every_s=3600)
    with caplog.at_level("INFO", logger="loramigrate"):
        for done in range(1, 11):
            report("search", done, 10, f"best {done}")
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["search 10/10 best 10"]


def test_a_default_run_logs_short_lines_and_minus_v_the_details(deeper_upgrade, data, tmp_path):
    """The old adapter as is on a deeper base (the report's copy arm): PEFT's kilobyte warning about the new layers'
    missing keys becomes one line of ours, each stage starts with one line, not its whole config; -v shows both.
    The default run is a real process, where Python prints warnings to stderr (pytest would catch them)."""
    old, new, _ = deeper_upgrade
    adapter = make_lora(old, tmp_path / "adapter", targets=["q_proj", "v_proj"])
    args = ["eval", "--base", str(new), "--adapter", str(adapter), "--data", str(data), "--limit", "20", "-o"]
    default = subprocess.run([sys.executable, "-m", "loramigrate", *args, str(tmp_path / "e")], capture_output=True,
                             text=True, env=python_env(), timeout=300)
    assert default.returncode == 0 and default.stdout == f"{tmp_path / 'e'}\n", default.stderr
    assert max(map(len, default.stderr.splitlines())) <= 300, default.stderr
    assert "Found missing adapter keys" not in default.stderr and "config:" not in default.stderr, default.stderr
    text = " ".join(default.stderr.split())
    assert "has no weights for 4 LoRA modules" in text and re.search(r"eval → \S+/e \(limit=20\)", text), text
    verbose = runner.invoke(app, ["-v", *args, str(tmp_path / "v")])
    assert verbose.exit_code == 0 and "Found missing adapter keys" in verbose.stderr, verbose.output
    assert "eval config:" in verbose.stderr and "layers.5.self_attn.v_proj" in verbose.stderr, verbose.stderr
