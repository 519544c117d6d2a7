"""`loramigrate align` end to end on tiny models with known ground truth."""

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loramigrate.alignment import load_alignment
from loramigrate.cli.main import app
from tests.conftest import shape_pair
from tests.helpers import FAMILIES, WORDS

runner = CliRunner()


def align(old, new, out, *extra):
    result = runner.invoke(app, ["-q", "align", "--old", str(old), "--new", str(new), "-o", str(out), *extra])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out)  # stdout carries only the output path
    return load_alignment(out)


def check_outputs(out):
    for name in ("alignment.safetensors", "alignment.json", "cka.png", "manifest.json"):
        assert (out / name).is_file(), name
    assert all(torch.isfinite(t.float()).all() for t in load_file(str(out / "alignment.safetensors")).values())
    meta = json.loads((out / "alignment.json").read_text())
    assert {"layer_map", "head_map", "scores", "shared_tokens", "options"} <= set(meta)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "align" and manifest["wall_s"] >= 0 and manifest["peak_rss_mb"] > 0
    assert set(manifest["inputs"]) == {"old", "new", "calib"}


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_pair_gives_identity_maps(tiny_models, tmp_path, family):
    a = align(tiny_models[family], tiny_models[family], tmp_path / "al")
    check_outputs(tmp_path / "al")
    n = a.new.n_layers
    assert a.layer_map == list(range(n))
    assert torch.allclose(a.cka.diagonal(), torch.ones(n, dtype=a.cka.dtype), atol=1e-6)
    assert torch.allclose(a.transfer, torch.eye(a.new.hidden), atol=1e-4)
    for la in a.layers.values():
        assert la.head_map == list(range(a.new.n_heads))
        assert torch.equal(la.mlp_map, torch.arange(a.new.intermediate))


def test_permuted_rotated_upgrade_is_recovered_exactly(known_upgrade, tmp_path):
    old, new, truth = known_upgrade
    a = align(old, new, tmp_path / "al")
    assert a.layer_map == truth.layer_map
    assert torch.allclose(a.transfer, truth.rotation, atol=1e-4)
    for la in a.layers.values():
        assert la.head_map == truth.head_map
        assert la.mlp_map.tolist() == truth.neuron_map


def test_inserted_layers_are_skipped_by_the_layer_map(deeper_upgrade, tmp_path):
    old, new, order = deeper_upgrade
    assert align(old, new, tmp_path / "al").layer_map == order


def test_shallower_new_model_maps_a_subset_of_old_layers_in_order(deeper_upgrade, tmp_path):
    old, new, order = deeper_upgrade
    a = align(new, old, tmp_path / "al")  # 6 → 4 layers
    assert a.layer_map == [j for j, i in enumerate(order) if i is not None]


@pytest.mark.parametrize(("old_kw", "new_kw"), [
    (dict(hidden=32), dict(hidden=48)),                              # hidden up
    (dict(hidden=48), dict(hidden=32)),                              # hidden down
    (dict(intermediate=64), dict(intermediate=96)),                  # MLP up
    (dict(layers=3, heads=4, kv_heads=4), dict(layers=2, heads=8, kv_heads=2)),  # MHA → GQA, fewer layers
    (dict(heads=8, kv_heads=2, head_dim=4), dict(heads=4, kv_heads=4, head_dim=16)),  # heads down, head dim up
])
def test_shape_changing_upgrades_give_complete_alignments(tmp_path, old_kw, new_kw):
    old, new = shape_pair(tmp_path, old_kw, new_kw)
    a = align(old, new, tmp_path / "al", "--cka", "minibatch")
    check_outputs(tmp_path / "al")
    assert len(a.layer_map) == a.new.n_layers
    for la in a.layers.values():
        assert len(la.head_map) == a.new.n_heads and la.mlp_map.shape == (a.new.intermediate,)
        assert la.head_sim.shape == (a.new.n_heads, a.old.n_heads)


def test_rerun_is_skipped_and_deterministic(tiny_models, tmp_path):
    out = tmp_path / "al"
    align(tiny_models["llama"], tiny_models["qwen2"], out)
    first = (out / "alignment.safetensors").read_bytes()
    stamp = (out / "manifest.json").stat().st_mtime_ns
    align(tiny_models["llama"], tiny_models["qwen2"], out)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp  # up to date: not redone
    align(tiny_models["llama"], tiny_models["qwen2"], out, "--force")
    assert (out / "alignment.safetensors").read_bytes() == first


@pytest.mark.parametrize(("mapper", "expected"), [
    ("first", [0, 1, 2, 3, None, None]),
    ("last", [None, None, 0, 1, 2, 3]),
    ("uniform", [0, None, 1, 2, None, 3]),  # 4 old layers spread evenly over 6 new ones
])
def test_ablation_layer_mappers_decide_the_layer_map(deeper_upgrade, tmp_path, mapper, expected):
    old, new, _ = deeper_upgrade
    a = align(old, new, tmp_path / "al", "--layer-map", mapper)
    assert a.layer_map == expected
    assert {j: la.old_layer for j, la in a.layers.items()} == {j: i for j, i in enumerate(expected) if i is not None}


def test_pooled_calibration_cuts_long_texts_into_windows_and_warns_on_few_rows(tmp_path):
    """Different tokenizers: one mean-pooled row per --seq-len window, so shorter windows give more rows."""
    from tests.helpers import build, make_tokenizer, save, tiny_config

    old = save(build(tiny_config("llama", hidden=16)), make_tokenizer(WORDS), tmp_path / "old")
    new = save(build(tiny_config("llama", hidden=16), seed=1), make_tokenizer(WORDS[::-1]), tmp_path / "new")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(" ".join(WORDS[k:k + 20]) for k in range(0, 100, 20)))  # 5 texts of 20 tokens
    rows = {}
    for seq_len in (20, 4):
        result = runner.invoke(app, ["align", "--old", str(old), "--new", str(new), "-o", str(tmp_path / str(seq_len)),
                                     "--calib", str(calib), "--seq-len", str(seq_len)])
        assert result.exit_code == 0, result.output
        rows[seq_len] = load_alignment(tmp_path / str(seq_len)).info["calibration"]["rows"]
        warned = f"CKA on {rows[seq_len]} pooled rows in up to 16 dimensions" in " ".join(result.stderr.split())
        assert warned == (rows[seq_len] < 16)
    assert rows == {20: 5, 4: 25}


def test_per_layer_transfer_recovers_the_rotation_at_every_depth(known_upgrade, tmp_path):
    old, new, truth = known_upgrade
    rng = random.Random(0)  # text over the whole tiny vocabulary, so block-0 inputs span the space
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(" ".join(rng.choices(WORDS, k=40)) for _ in range(40)))
    a = align(old, new, tmp_path / "al", "--per-layer-transfer", "--calib", str(calib))
    for la in a.layers.values():
        assert torch.allclose(la.transfer, truth.rotation, atol=1e-3)
        assert la.head_map == truth.head_map and la.mlp_map.tolist() == truth.neuron_map
    assert all(c > 0.999 for c in a.info["scores"]["layer_transfer_fit_cosine"].values())


def test_same_seed_gives_byte_identical_artifacts(tiny_models, tmp_path):
    for out in ("a", "b"):
        align(tiny_models["gemma"], tiny_models["llama"], tmp_path / out)
    for name in ("alignment.safetensors", "alignment.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert "phase_wall_s" in json.loads((tmp_path / "a" / "manifest.json").read_text())


def test_head_outputs_recover_the_permutation_and_value_maps(known_upgrade, tmp_path):
    old, new, truth = known_upgrade
    a = align(old, new, tmp_path / "al", "--head-similarity", "activations")
    eye = torch.eye(a.new.head_dim).expand(a.new.n_heads, -1, -1)
    for la in a.layers.values():
        assert la.head_map == truth.head_map
        assert torch.allclose(la.v_map, eye, atol=1e-3)
        matched = la.head_sim[torch.arange(a.new.n_heads), torch.tensor(truth.head_map)]
        assert torch.allclose(matched, torch.ones_like(matched), atol=1e-4)


def test_mlp_activations_recover_the_neuron_permutation(known_upgrade, tmp_path):
    old, new, truth = known_upgrade
    a = align(old, new, tmp_path / "al", "--mlp-similarity", "activations")
    for la in a.layers.values():
        assert la.mlp_map.tolist() == truth.neuron_map
        assert torch.allclose(la.mlp_score, torch.ones_like(la.mlp_score), atol=1e-2)


@pytest.mark.parametrize("name", ["hungarian", "mutual_best", "greedy"])
def test_neuron_matchers_are_one_to_one_and_find_a_planted_permutation(name):
    from loramigrate.align.mlp_map import MLP_MATCHERS

    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    sim = torch.rand(60, 50, generator=torch.Generator().manual_seed(1)) * 0.5
    sim[torch.arange(50), perm] = 1.0  # new neuron k ← old neuron perm[k]; 10 new neurons without a source
    got = MLP_MATCHERS[name](sim)
    assert got[:50].tolist() == perm.tolist() and (got[50:] == -1).all()
