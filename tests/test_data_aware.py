"""Data-aware transfer (`transfer --prompts`): what the maths guarantees on tiny models."""

import json

import pytest
import torch
import transformers
from peft import PeftModel
from typer.testing import CliRunner

from loramigrate.cli.main import app
from loramigrate.transfer.data_aware import reduced_rank_fit, ridge_fit, sink_tokens
from tests.conftest import shape_pair
from tests.helpers import WORDS, make_lora

runner = CliRunner()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cli(*args, ok: bool = True):
    result = runner.invoke(app, ["-q", *map(str, args)])
    if ok:
        assert result.exit_code == 0, result.output
    return result


def prompts_file(path, n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [{"prompt": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=g).tolist())}
            for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def logits(base_dir, adapter_dir, ids):
    model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base_dir), str(adapter_dir))
    with torch.no_grad():
        return model.eval()(ids).logits


def fit_report(out):
    return json.loads((out / "transfer_report.json").read_text())["data_aware"]


def test_function_preserving_upgrade_keeps_the_old_logits(known_upgrade, tmp_path):
    """Heads, kv groups and neurons permuted, residual rotated: the weight-space transfer is already
    exact, so the data-aware fit starts at R² = 1 and must not move away from it."""
    old, new, _ = known_upgrade
    cli("align", "--old", old, "--new", new, "-o", tmp_path / "align")
    adapter = make_lora(old, tmp_path / "lora", targets=ALL)
    out = tmp_path / "t"
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "--prompts", prompts_file(tmp_path / "p.jsonl"),
        "--fit-steps", 5, "-o", out)
    rows = fit_report(out)["layers"]
    assert all(r["effect_r2_before"] > 0.999 and r["effect_r2_after"] >= r["effect_r2_before"] for r in rows)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = logits(old, adapter, ids), logits(new, out, ids)
    assert (want - got).abs().max() < 1e-3 * max(1.0, float(want.abs().max()))


def test_unrelated_pair_fit_moves_blocks_toward_the_mapped_effect(tmp_path):
    """Two separately initialised models: the weight-space map keeps little of the effect; the fit
    raises every adapted block's effect R² and never lowers it."""
    old, new = shape_pair(tmp_path, {"hidden": 32, "layers": 2}, {"hidden": 48, "layers": 3})
    cli("align", "--old", old, "--new", new, "--per-layer-transfer", "-o", tmp_path / "align")
    adapter = make_lora(old, tmp_path / "lora", targets=ALL, r=4, alpha=16)
    out = tmp_path / "t"
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "--prompts", prompts_file(tmp_path / "p.jsonl"),
        "--fit-steps", 40, "--fit-lr", 3e-3, "--fill", "nearest", "-o", out)
    rows = [r for r in fit_report(out)["layers"] if "effect_r2_after" in r]
    assert rows and all(r["effect_r2_after"] >= r["effect_r2_before"] for r in rows)
    assert sum(r["effect_r2_after"] - r["effect_r2_before"] for r in rows) / len(rows) > 0.05
    assert all(r["stream_fit_r2"] > 0 for r in rows if r["source_layer"] is not None)


def test_ridge_fit_agrees_with_direct_least_squares():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(200, 6, generator=g), torch.randn(3, 6, generator=g)
    y = x @ w.T + 0.5
    fitted = ridge_fit(x, y, ridge=0.0, bias=True)
    direct = torch.linalg.lstsq(torch.cat([x, torch.ones(200, 1)], 1).double(), y.double()).solution.T.float()
    assert torch.allclose(fitted, direct, atol=1e-4)


@pytest.mark.parametrize("content, message", [
    ("", "holds no examples"),
    ('{"label": 1}\n', "expected 'prompt' and 'completion' strings, or 'text'"),
    ('{"prompt": "alpha"}\n', "prompt tokens, the rank-4 fit needs at least 16"),
], ids=["empty", "no-field", "too-few-tokens"])
def test_bad_prompts_fail_cleanly_and_write_nothing(tiny_models, tmp_path, content, message):
    model = tiny_models["llama"]
    cli("align", "--old", model, "--new", model, "-o", tmp_path / "align")
    adapter = make_lora(model, tmp_path / "lora", targets=["q_proj"], r=4)
    (tmp_path / "p.jsonl").write_text(content)
    result = cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "--prompts", tmp_path / "p.jsonl",
                 "-o", tmp_path / "t", ok=False)
    assert result.exit_code == 1 and message in result.output
    assert not (tmp_path / "t").exists() and not list(tmp_path.glob("t.tmp-*"))


def test_reduced_rank_fit_is_least_squares_at_full_rank_and_optimal_below():
    g = torch.Generator().manual_seed(1)
    z, w = torch.randn(400, 8, generator=g), torch.randn(6, 8, generator=g)
    y = z @ w.T + 0.01 * torch.randn(400, 6, generator=g)
    b, a = reduced_rank_fit(z, y, rank=6)
    direct = torch.linalg.lstsq(z.double(), y.double()).solution.T.float()
    assert torch.allclose(b @ a, direct, atol=1e-3)
    b2, a2 = reduced_rank_fit(z, y, rank=2)
    u, s, vh = torch.linalg.svd(direct)
    truncated = (u[:, :2] * s[:2]) @ vh[:2]  # another rank-2 candidate: the truncated least-squares map
    err = lambda m: float((z @ m.T - y).pow(2).sum())  # noqa: E731
    assert err(b2 @ a2) <= err(truncated) + 1e-4


def test_rrr_solver_never_lowers_the_effect_fit(tmp_path):
    old, new = shape_pair(tmp_path, {"hidden": 32, "layers": 2}, {"hidden": 48, "layers": 2})
    cli("align", "--old", old, "--new", new, "--per-layer-transfer", "-o", tmp_path / "align")
    adapter = make_lora(old, tmp_path / "lora", targets=ALL, r=4, alpha=16)
    out = tmp_path / "t"
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "--prompts", prompts_file(tmp_path / "p.jsonl"),
        "--fit-solver", "rrr", "-o", out)
    rows = [r for r in fit_report(out)["layers"] if "effect_r2_after" in r]
    assert rows and all(r["effect_r2_after"] >= r["effect_r2_before"] for r in rows)
    assert max(r["effect_r2_after"] - r["effect_r2_before"] for r in rows) > 0.05


def test_saved_classifier_head_is_refitted_to_the_old_pairs_logits(tmp_path):
    """An unrelated encoder pair: the weight-space map of the classifier explains little of the old logits;
    the ridge refit on the new model's features explains more, and stock PEFT loads the result."""
    from peft import LoraConfig, get_peft_model

    old, new = shape_pair(tmp_path, {"hidden": 32, "layers": 2}, {"hidden": 48, "layers": 3}, family="bert")
    model = transformers.AutoModelForSequenceClassification.from_pretrained(old, num_labels=3)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                  task_type="SEQ_CLS", init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "lora")
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (8,), generator=g).tolist())}
            for _ in range(200)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cli("align", "--old", old, "--new", new, "--per-layer-transfer", "-o", tmp_path / "align")
    out = tmp_path / "t"
    cli("transfer", "--align", tmp_path / "align", "--adapter", tmp_path / "lora", "--prompts", tmp_path / "p.jsonl",
        "--fit-steps", 0, "-o", out)
    heads = fit_report(out)["heads"]
    assert heads, "no saved head was refitted"
    for fit in heads.values():
        assert fit["output_r2_after"] > max(fit["output_r2_before"], 0.0)  # beats the weight-space map and the mean


def test_sink_tokens_flags_a_massive_token_and_nothing_else():
    g = torch.Generator().manual_seed(0)
    layers = [[torch.randn(2, 6, 16, generator=g)] for _ in range(3)]
    layers[1][0][1, 0, 5] = 500.0  # batch row 1, first position: a sink in the middle layer only
    layers[2][0][0, 5, :] = 900.0  # padded position: never a kept token, never a sink
    mask = torch.ones(2, 6)
    mask[0, 5] = 0
    (sinks,) = sink_tokens(layers, [mask])
    expected = torch.zeros(2, 6, dtype=torch.bool)
    expected[1, 0] = True
    assert torch.equal(sinks, expected)
