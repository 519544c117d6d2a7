"""Bad input to `transfer`: one red line, exit code 1, nothing written."""

import json

import pytest
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loramigrate.cli.main import app
from tests.helpers import make_lora, make_tiny

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("tb")
    result = runner.invoke(app, ["-q", "align", "--old", str(tiny_models["llama"]), "--new", str(tiny_models["mistral"]),
                                 "-o", str(root / "align")])
    assert result.exit_code == 0, result.output
    adapter = make_lora(tiny_models["llama"], root / "lora", targets=["q_proj", "v_proj"])
    wide = make_tiny("llama", root / "wide", hidden=48)
    other = make_lora(wide, root / "other", targets=["q_proj"])
    return root / "align", adapter, other


def fails(tmp_path, align_dir, adapter, match):
    out = tmp_path / "out"
    before = set(tmp_path.rglob("*"))
    result = runner.invoke(app, ["transfer", "--align", str(align_dir), "--adapter", str(adapter), "-o", str(out)])
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("error:") and match in result.stderr, result.stderr
    assert result.stdout == "" and set(tmp_path.rglob("*")) == before


def copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_not_a_lora_adapter(setup, tmp_path):
    align_dir, adapter, _ = setup
    bad = copy_dir(adapter, tmp_path / "ia3")
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    fails(tmp_path, align_dir, bad, "only LoRA adapters")


def test_adapter_for_another_base(setup, tmp_path):
    align_dir, _, other = setup
    fails(tmp_path, align_dir, other, "different base")


def test_missing_and_corrupt_adapter_files(setup, tmp_path):
    align_dir, adapter, _ = setup
    fails(tmp_path, align_dir, tmp_path / "nothing", "not a PEFT adapter directory")
    bad = copy_dir(adapter, tmp_path / "corrupt")
    (bad / "adapter_model.safetensors").write_bytes(b"garbage")
    fails(tmp_path, align_dir, bad, "cannot read adapter")


def test_incomplete_or_foreign_alignment(setup, tmp_path):
    align_dir, adapter, _ = setup
    partial = copy_dir(align_dir, tmp_path / "partial")
    (partial / "alignment.safetensors").unlink()
    fails(tmp_path, partial, adapter, "not an alignment directory")
    old_format = copy_dir(align_dir, tmp_path / "old_format")
    manifest = json.loads((old_format / "manifest.json").read_text())
    (old_format / "manifest.json").write_text(json.dumps({**manifest, "schema": 0}))
    fails(tmp_path, old_format, adapter, "rerun its stage")
    fails(tmp_path, adapter, adapter, "not a finished stage directory")


def test_module_the_alignment_cannot_map(setup, tmp_path):
    align_dir, adapter, _ = setup
    bad = copy_dir(adapter, tmp_path / "embed")
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    tensors[key.replace("self_attn.q_proj", "self_attn.rotary")] = tensors[key].clone()
    tensors[key.replace("self_attn.q_proj", "self_attn.rotary").replace("lora_A", "lora_B")] = tensors[
        key.replace("lora_A", "lora_B")].clone()
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    fails(tmp_path, align_dir, bad, "not one of the old base's")
