"""Bad input to `align`: one red line naming the problem, exit code 1, nothing written."""

import pytest
import transformers
from typer.testing import CliRunner

from loramigrate.cli.main import app
from tests.helpers import WORDS, build, make_tokenizer, save, tiny_config

runner = CliRunner()


def fails(tmp_path, old, new, *extra, match: str):
    out = tmp_path / "out"
    before = set(tmp_path.rglob("*"))
    result = runner.invoke(app, ["align", "--old", str(old), "--new", str(new), "-o", str(out), *extra])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.strip().splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error:"), result.stderr
    assert match in result.stderr, result.stderr
    assert "Traceback" not in result.output
    assert set(tmp_path.rglob("*")) == before  # no output directory, no temp directory
    assert result.stdout == ""


def test_missing_model_dir(tiny_models, tmp_path):
    fails(tmp_path, tmp_path / "nope", tiny_models["llama"], match="not found")


def test_directory_that_is_not_a_model(tiny_models, tmp_path):
    (tmp_path / "empty").mkdir()
    fails(tmp_path, tmp_path / "empty", tiny_models["llama"], match="no config.json")


def test_corrupt_safetensors(tiny_models, tmp_path):
    bad = save(build(tiny_config("llama")), make_tokenizer(WORDS), tmp_path / "bad")
    (bad / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    fails(tmp_path, bad, tiny_models["llama"], match="cannot load model")


def test_unsupported_architecture(tiny_models, tmp_path):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=112))
    d = save(gpt2, make_tokenizer(WORDS), tmp_path / "gpt2")
    fails(tmp_path, d, tiny_models["llama"], match="cannot infer the architecture")


def test_tokenizers_without_shared_tokens(tiny_models, tmp_path):
    words = [f"zz{w}" for w in WORDS]
    other = save(build(tiny_config("llama")), make_tokenizer(words, pad="<pad>", unk="<unk>"), tmp_path / "other")
    fails(tmp_path, tiny_models["llama"], other, match="share 0 tokens")


@pytest.mark.parametrize(("content", "match"), [("", "holds no text"), ("\n\n  \n", "holds no text")])
def test_empty_calibration_file(tiny_models, tmp_path, content, match):
    calib = tmp_path / "calib.txt"
    calib.write_text(content)
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--calib", str(calib), match=match)


def test_unreadable_calibration_file(tiny_models, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_bytes(b"\xff\xfe\xfa not utf-8")
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--calib", str(calib), match="cannot read calibration")


def test_bad_jsonl_calibration_line(tiny_models, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "fine"}\n{"label": 3}\n')
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--calib", str(calib), match="calib.jsonl:2")


def test_output_path_is_a_file(tiny_models, tmp_path):
    target = tmp_path / "out"
    target.write_text("taken")
    result = runner.invoke(app, ["align", "--old", str(tiny_models["llama"]), "--new", str(tiny_models["llama"]),
                                 "-o", str(target)])
    assert result.exit_code == 1 and "is a file" in result.stderr
    assert target.read_text() == "taken" and list(tmp_path.iterdir()) == [target]


def test_invalid_option_value(tiny_models, tmp_path):
    fails(tmp_path, tiny_models["llama"], tiny_models["llama"], "--layer-map", "zigzag", match="layer_map")


def test_debug_env_shows_the_traceback(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMIGRATE_DEBUG", "1")
    result = runner.invoke(app, ["align", "--old", str(tmp_path / "nope"), "--new", str(tiny_models["llama"]),
                                 "-o", str(tmp_path / "o")])
    assert result.exit_code != 0 and result.exception is not None
