"""Hub ids are pinned: a stage records the commit its hub model resolved to, and reruns when the hub moves on.
Offline, on a hub cache laid out as huggingface_hub writes it.

    pytest tests/test_hub.py
"""

import json

import huggingface_hub
import pytest

from loramigrate.align.runner import run_align
from loramigrate.config import AlignConfig
from loramigrate.errors import ArtifactError
from loramigrate.models import hub_commit, load_model, resolve_model
from tests.helpers import make_tiny

FIRST, SECOND = "1" * 40, "2" * 40


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub cache holding ``org/tiny`` at two commits, ``main`` at the first."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = tmp_path / "hub" / "models--org--tiny"
    for seed, commit in enumerate((FIRST, SECOND)):
        make_tiny("llama", repo / "snapshots" / commit, seed=seed)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FIRST)
    hub_commit.cache_clear()
    yield repo
    hub_commit.cache_clear()


def test_a_hub_id_resolves_to_its_commit_and_loads_that_commit(hub):
    ref = resolve_model("org/tiny")
    assert (ref.source, ref.revision, ref.path) == ("org/tiny", FIRST, f"org/tiny@{FIRST}")
    pinned = resolve_model(f"org/tiny@{SECOND}")
    assert pinned.path == f"org/tiny@{SECOND}"
    first, second = load_model(ref), load_model(pinned)
    assert not first.model.embed_tokens.weight.equal(second.model.embed_tokens.weight)
    with pytest.raises(ArtifactError, match="org/missing not found"):
        resolve_model("org/missing")


def test_the_manifest_records_the_commit_and_the_stage_reruns_when_the_hub_moves_on(hub, tmp_path):
    cfg = AlignConfig(old="org/tiny", new="org/tiny", max_tokens=64)
    out = tmp_path / "align"
    assert run_align(cfg, out)
    inputs = json.loads((out / "manifest.json").read_text())["inputs"]
    assert inputs["new"] == {"path": f"org/tiny@{FIRST}", "sha256": f"hub:org/tiny@{FIRST}"}
    assert not run_align(cfg, out)  # the same commit: kept
    (hub / "refs" / "main").write_text(SECOND)
    hub_commit.cache_clear()  # a new run
    assert run_align(cfg, out)
    assert json.loads((out / "manifest.json").read_text())["inputs"]["old"]["path"] == f"org/tiny@{SECOND}"


def test_later_stages_load_the_commit_align_pinned_even_after_the_hub_moves_on(hub, tmp_path):
    from peft import AutoPeftModelForCausalLM

    from loramigrate.config import TransferConfig
    from loramigrate.transfer.runner import run_transfer
    from tests.helpers import make_lora

    run_align(AlignConfig(old="org/tiny", new="org/tiny", max_tokens=64), tmp_path / "align")
    (hub / "refs" / "main").write_text(SECOND)  # the hub moves on after the alignment
    hub_commit.cache_clear()
    adapter = make_lora(hub / "snapshots" / FIRST, tmp_path / "lora", targets=["q_proj", "v_proj"])
    assert run_transfer(TransferConfig(align=str(tmp_path / "align"), adapter=str(adapter)), tmp_path / "t")
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == ("org/tiny", FIRST)
    reloaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "t"))  # stock PEFT finds the pinned commit
    first = load_model(resolve_model(f"org/tiny@{FIRST}"))
    assert reloaded.base_model.model.model.embed_tokens.weight.equal(first.model.embed_tokens.weight)
