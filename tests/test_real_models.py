"""align on the real testbed pairs. Run: python -m loramigrate.testbed [--qwen] && pytest -m slow

Each test runs when the models it names are in the cache, and is skipped, saying which fetch
brings them, when they are not.
"""

import json

import pytest
import torch
from typer.testing import CliRunner

from loramigrate.alignment import load_alignment
from loramigrate.cli.main import app
from tests.conftest import CACHE

pytestmark = pytest.mark.slow
runner = CliRunner()
MODELS = CACHE / "models"


def needs(*names: str):
    missing = [n for n in names if not (MODELS / n).is_dir()]
    fetch = "python -m loramigrate.testbed" + (" --qwen" if any(n.startswith("qwen") for n in missing) else "")
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not in {MODELS}: run {fetch}")


PAIRS = {
    "minilm-l3→l6": ("minilm-l3", "minilm-l6"),          # BERT, same tokenizer, 3 → 6 layers
    "smollm2→qwen0.5b": ("smollm2-135m", "qwen2.5-coder-0.5b"),  # Llama → Qwen2, different tokenizers
}


@pytest.mark.parametrize("pair", [pytest.param(k, marks=needs(*v)) for k, v in sorted(PAIRS.items())])
def test_align_real_pair(tmp_path, pair):
    old, new = (MODELS / name for name in PAIRS[pair])
    out = tmp_path / "align"
    result = runner.invoke(app, ["-q", "align", "--old", str(old), "--new", str(new), "--max-tokens", "1024",
                                 "-o", str(out)])
    assert result.exit_code == 0, result.output
    a = load_alignment(out)
    sources = [i for i in a.layer_map if i is not None]
    assert len(a.layer_map) == a.new.n_layers and sources == sorted(set(sources))
    assert len(sources) == min(a.old.n_layers, a.new.n_layers)
    assert torch.isfinite(a.cka).all() and torch.isfinite(a.transfer).all()
    assert float(a.cka.max()) > 0.3  # real pairs share structure; an all-noise CKA means broken rows
    for la in a.layers.values():
        assert torch.isfinite(la.head_sim).all()
        assert sum(h is not None for h in la.head_map) == min(a.old.n_heads, a.new.n_heads)
    meta = json.loads((out / "alignment.json").read_text())
    assert meta["shared_tokens"]["count"] > 1000
    assert (out / "cka.png").stat().st_size > 1000


@needs("minilm-l6-int8", "minilm-l6")
def test_near_identity_real_pair_gives_identity_maps(tmp_path):
    """Pair B: all-MiniLM-L6-v2 int8-dequantised → fp32, weights within ~2 %."""
    out = tmp_path / "align"
    result = runner.invoke(app, ["-q", "align", "--old", str(MODELS / "minilm-l6-int8"),
                                 "--new", str(MODELS / "minilm-l6"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    a = load_alignment(out)
    assert a.layer_map == list(range(6))
    assert all(la.head_map == list(range(12)) for la in a.layers.values())
    assert torch.allclose(a.transfer, torch.eye(384), atol=0.05)
    assert all(float((la.mlp_map == torch.arange(1536)).float().mean()) > 0.99 for la in a.layers.values())
