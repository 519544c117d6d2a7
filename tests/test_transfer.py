"""`loramigrate transfer`: properties the maths can prove, on tiny models with known ground truth."""

import json

import pytest
import torch
import transformers
from peft import PeftModel
from typer.testing import CliRunner

from loramigrate.adapters import read_adapter
from loramigrate.cli.main import app
from loramigrate.lora import refactor
from tests.conftest import shape_pair
from tests.helpers import WORDS, build, make_lora, make_tokenizer, randomize_norms, save, tiny_config
from tests.reshapes import widen_hidden

runner = CliRunner()
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cli(*args):
    result = runner.invoke(app, ["-q", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def deltas(adapter_dir):
    a = read_adapter(adapter_dir)
    return {name: a.scale(name) * m.b @ m.a for name, m in a.modules.items()}


def cls_logits(base_dir, adapter_dir, num_labels):
    ids = torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=num_labels)
    base.config.pad_token_id = 0
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def logits(base_dir, adapter_dir, ids):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def aligned_upgrade(known_upgrade, tmp_path_factory):
    old, new, truth = known_upgrade
    out = tmp_path_factory.mktemp("al") / "align"
    cli("align", "--old", old, "--new", new, "-o", out)
    return old, new, truth, out


@pytest.mark.parametrize("lora_kw", [
    {"targets": ALL},
    {"targets": ["q_proj", "v_proj"], "r": 8},
    {"targets": ALL, "use_rslora": True, "rank_pattern": {"q_proj": 2}, "alpha_pattern": {"down_proj": 3.0}},
], ids=["all-modules", "qv-r8", "rslora-patterns"])
def test_function_preserving_upgrade_gives_the_same_logits(aligned_upgrade, tmp_path, lora_kw):
    old, new, _, align_dir = aligned_upgrade
    adapter = make_lora(old, tmp_path / "lora", **lora_kw)
    out = tmp_path / "transfer"
    cli("transfer", "--align", align_dir, "--adapter", adapter, "-o", out)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    want, got = logits(old, adapter, ids), logits(new, out, ids)
    base = transformers.AutoModelForCausalLM.from_pretrained(old)
    with torch.no_grad():
        effect = (want - base(ids).logits).abs().max()
    assert effect > 1e-2  # the adapter does something measurable
    assert (want - got).abs().max() < 1e-3 * max(1.0, float(want.abs().max()))


def test_identity_upgrade_reproduces_every_delta(tiny_models, tmp_path):
    model = tiny_models["llama"]
    cli("align", "--old", model, "--new", model, "-o", tmp_path / "align")
    adapter = make_lora(model, tmp_path / "lora", targets=ALL, r=4, use_rslora=True)
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "-o", tmp_path / "t")
    before, after = deltas(adapter), deltas(tmp_path / "t")
    assert set(before) == set(after)
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-5), name
    config = json.loads((tmp_path / "t" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(model) and config["use_rslora"] is True


def test_refactor_is_exact_at_full_rank_and_auto_keeps_the_energy():
    g = torch.Generator().manual_seed(0)
    b, a = torch.randn(40, 6, generator=g), torch.randn(6, 30, generator=g)
    b2, a2, kept = refactor(b, a, rank=6)
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-4) and kept == pytest.approx(1.0)
    s = torch.linalg.svdvals(b @ a)
    b3, a3, kept = refactor(b, a, energy=0.9)
    k = b3.shape[1]
    assert kept >= 0.9 and float(s[: k - 1].pow(2).sum() / s.pow(2).sum()) < 0.9
    assert torch.allclose(torch.linalg.norm(b3.T @ b3), torch.linalg.norm(a3 @ a3.T), rtol=1e-4)  # balanced


@pytest.mark.parametrize("fill", ["none", "nearest", "interpolate"])
def test_deeper_new_model_fills_new_layers_by_policy(deeper_upgrade, tmp_path, fill):
    old, new, order = deeper_upgrade
    cli("align", "--old", old, "--new", new, "-o", tmp_path / "align")
    adapter = make_lora(old, tmp_path / "lora", targets=["q_proj", "down_proj"])
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "--fill", fill, "-o", tmp_path / "t")
    report = json.loads((tmp_path / "t" / "transfer_report.json").read_text())["modules"]
    layers = {r["layer"] for r in report}
    inserted = {j for j, i in enumerate(order) if i is None}
    assert layers == (set(range(len(order))) - inserted if fill == "none" else set(range(len(order))))
    assert all(r["fill"].startswith(fill) for r in report if r["layer"] in inserted)


@pytest.mark.parametrize(("old_kw", "new_kw"), [
    (dict(heads=4, kv_heads=4, layers=3), dict(heads=8, kv_heads=2, layers=2)),   # MHA → GQA, heads up, layers down
    (dict(heads=8, kv_heads=2, head_dim=4), dict(heads=4, kv_heads=4, head_dim=16, hidden=48)),  # heads down, dims up
    (dict(intermediate=64), dict(intermediate=96, layers=3)),                     # MLP and layers up
    (dict(hidden=48, intermediate=96), dict(hidden=32, intermediate=64)),         # hidden and MLP down
])
def test_shape_changing_upgrades_give_loadable_nonzero_adapters(tmp_path, old_kw, new_kw):
    old, new = shape_pair(tmp_path, old_kw, new_kw)
    cli("align", "--old", old, "--new", new, "-o", tmp_path / "align")
    adapter = make_lora(old, tmp_path / "lora", targets=ALL)
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "--rank", "auto", "-o", tmp_path / "t")
    for name, d in deltas(tmp_path / "t").items():  # verify already reloaded it with stock PEFT
        assert torch.isfinite(d).all() and d.norm() > 0, name
    report = json.loads((tmp_path / "t" / "transfer_report.json").read_text())
    used = {r["source_layer"] for r in report["modules"] if r["source"]}
    dropped_layers = {int(n.split(".")[2]) for n in report["dropped_sources"]}
    assert used.isdisjoint(dropped_layers) and len(used | dropped_layers) == old_kw.get("layers", 2)


def test_classification_head_in_modules_to_save_is_carried(tiny_models, tmp_path):
    from peft import LoraConfig, TaskType, get_peft_model
    from safetensors.torch import load_file

    model = tiny_models["bert"]
    base = transformers.AutoModelForSequenceClassification.from_pretrained(model, num_labels=3)
    peft_model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"],
                                                 init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "cls")
    cli("align", "--old", model, "--new", model, "-o", tmp_path / "align")
    cli("transfer", "--align", tmp_path / "align", "--adapter", tmp_path / "cls", "-o", tmp_path / "t")
    before = load_file(str(tmp_path / "cls" / "adapter_model.safetensors"))
    after = load_file(str(tmp_path / "t" / "adapter_model.safetensors"))
    heads = [k for k in before if "classifier" in k]
    assert heads and all(torch.allclose(before[k], after[k], atol=1e-5) for k in heads)


def test_vocabulary_change_with_a_shared_subset(tmp_path):
    words = WORDS[::-1][:80] + [f"new{i}" for i in range(30)]  # shuffled ids, 80 shared words, 30 new ones
    old = save(build(tiny_config("llama")), make_tokenizer(WORDS), tmp_path / "old")
    new = save(build(tiny_config("llama", vocab=len(words) + 2, hidden=48), seed=1), make_tokenizer(words), tmp_path / "new")
    cli("align", "--old", old, "--new", new, "-o", tmp_path / "align")
    meta = json.loads((tmp_path / "align" / "alignment.json").read_text())
    assert meta["shared_tokens"]["count"] == 82 and meta["calibration"]["rows_are"].startswith("sequences")
    adapter = make_lora(old, tmp_path / "lora", targets=ALL)
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "-o", tmp_path / "t")
    assert all(torch.isfinite(d).all() and d.norm() > 0 for d in deltas(tmp_path / "t").values())


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (32, 32)])
def test_pseudo_inverse_matches_the_svd_pinv(shape):
    from loramigrate.lora import pseudo_inverse

    t = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(pseudo_inverse(t), torch.linalg.pinv(t), atol=1e-4)


def permute_neox_heads(model, perm):
    """In place: reorder the heads of every GPT-NeoX block (fused qkv rows and dense columns)."""
    cfg = model.config
    h, hd, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.hidden_size
    with torch.no_grad():
        for layer in model.gpt_neox.layers:
            qkv, dense = layer.attention.query_key_value, layer.attention.dense
            qkv.weight.copy_(qkv.weight.view(h, 3 * hd, d)[perm].reshape(3 * d, d))
            qkv.bias.copy_(qkv.bias.view(h, 3 * hd)[perm].reshape(-1))
            dense.weight.copy_(dense.weight.view(d, h, hd)[:, perm].reshape(d, d))


def test_fused_qkv_adapter_follows_permuted_heads(tmp_path):
    old_model = build(tiny_config("neox", hidden=64, heads=8, layers=2, intermediate=96, init=0.2))
    new_model = build(tiny_config("neox", hidden=64, heads=8, layers=2, intermediate=96, init=0.2))
    new_model.load_state_dict(old_model.state_dict())
    permute_neox_heads(new_model, [3, 1, 7, 0, 2, 6, 5, 4])
    tok = make_tokenizer(WORDS)
    old, new = save(old_model, tok, tmp_path / "old"), save(new_model, tok, tmp_path / "new")
    cli("align", "--old", old, "--new", new, "-o", tmp_path / "align")
    adapter = make_lora(old, tmp_path / "lora", targets=["query_key_value", "dense"])
    cli("transfer", "--align", tmp_path / "align", "--adapter", adapter, "-o", tmp_path / "t")
    ids = torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(0))
    want, got = logits(old, adapter, ids), logits(new, tmp_path / "t", ids)
    assert (want - got).abs().max() < 1e-3 * max(1.0, float(want.abs().max()))


def test_a_trained_classifier_moves_through_a_rotated_upgrade_with_the_same_logits(aligned_upgrade, tmp_path):
    """finetune trains a Llama classifier (LoRA + `score` head); its head reads the rotated residual."""
    old, new, _, align_dir = aligned_upgrade
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"word{i} day", "label": "ab"[i % 2]}) + "\n" for i in range(12)))
    cli("finetune", "--base", old, "--data", data, "--steps", "3", "--rank", "4", "--lr", "1e-2", "-o", tmp_path / "cls")
    cli("transfer", "--align", align_dir, "--adapter", tmp_path / "cls", "-o", tmp_path / "t")
    assert torch.allclose(cls_logits(old, tmp_path / "cls", 2), cls_logits(new, tmp_path / "t", 2), atol=1e-4)


def test_a_classifier_head_reads_a_wider_hidden_state_with_the_same_logits(tmp_path):
    """Hidden 64 → 96 (scaled orthogonal embedding, other norm scales): the `score` head changes shape."""
    from peft import LoraConfig, TaskType, get_peft_model

    base = build(tiny_config("llama", hidden=64, layers=2, heads=8, kv_heads=4, intermediate=96, init=0.2))
    randomize_norms(base)
    tok = make_tokenizer(WORDS)
    old, new = save(base, tok, tmp_path / "old"), save(widen_hidden(base, 96), tok, tmp_path / "new")
    classifier = transformers.AutoModelForSequenceClassification.from_pretrained(old, num_labels=3)
    peft_model = get_peft_model(classifier, LoraConfig(task_type=TaskType.SEQ_CLS, r=4, init_lora_weights=False,
                                                       target_modules=["q_proj", "down_proj"]))
    with torch.no_grad():  # a head far from its near-zero init, so a wrong input scale shows
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name:
                p.copy_(torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "cls")
    cli("align", "--old", old, "--new", new, "-o", tmp_path / "align")
    cli("transfer", "--align", tmp_path / "align", "--adapter", tmp_path / "cls", "-o", tmp_path / "t")
    want, got = cls_logits(old, tmp_path / "cls", 3), cls_logits(new, tmp_path / "t", 3)
    assert want.abs().max() > 1 and torch.allclose(want, got, rtol=1e-4, atol=1e-4)


def test_a_head_chain_maps_only_the_module_that_reads_the_hidden_state(aligned_upgrade):
    """pooler → classifier: the pooler reads the final-normed residual; the classifier reads the pooler's output."""
    from loramigrate.adapters import LoraAdapter
    from loramigrate.alignment import load_alignment
    from loramigrate.transfer.runner import _map_extra

    old, _, truth, align_dir = aligned_upgrade
    alignment = load_alignment(align_dir)
    d = alignment.old.hidden
    g = torch.Generator().manual_seed(0)
    extra = {"pooler.dense.weight": torch.randn(d, d, generator=g), "pooler.dense.bias": torch.randn(d, generator=g),
             "classifier.weight": torch.randn(3, d, generator=g), "classifier.bias": torch.randn(3, generator=g)}
    mapped = _map_extra(LoraAdapter(config={}, modules={}, extra=extra), alignment)
    # ground truth: the new final norm is folded to ones and h_new = R h_old, so W' = W diag(g_old) Rᵀ
    g_old = transformers.AutoModelForCausalLM.from_pretrained(old).model.norm.weight.detach()
    reads = extra["pooler.dense.weight"] * g_old @ truth.rotation.T
    assert torch.allclose(mapped["pooler.dense.weight"], reads, atol=1e-5)
    for key in ("pooler.dense.bias", "classifier.weight", "classifier.bias"):
        assert torch.equal(mapped[key], extra[key]), key


def test_a_pooler_and_classifier_compute_the_same_function_on_a_wider_base(tmp_path):
    """BERT's classifier reads the pooler's own units (arch.HEAD_INPUTS), so on a 32 → 48 wide upgrade they are
    widened with zeros, not mapped through T; the transferred adapter loads with stock PEFT (transfer verifies)."""
    from peft import LoraConfig, TaskType, get_peft_model

    from loramigrate.alignment import load_alignment
    from loramigrate.lora import normed_input_map, pseudo_inverse

    old, new = shape_pair(tmp_path, {"hidden": 32}, {"hidden": 48}, family="bert")
    cli("align", "--old", old, "--new", new, "-o", tmp_path / "align")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(old, num_labels=3)
    lora = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"], init_lora_weights=False,
                      modules_to_save=["bert.pooler.dense"])
    get_peft_model(base, lora).save_pretrained(tmp_path / "cls")
    cli("transfer", "--align", tmp_path / "align", "--adapter", tmp_path / "cls", "-o", tmp_path / "t")
    before, after = read_adapter(tmp_path / "cls").extra, read_adapter(tmp_path / "t").extra
    assert {k: tuple(v.shape) for k, v in after.items()} == {
        "bert.pooler.dense.weight": (48, 48), "bert.pooler.dense.bias": (48,), "classifier.weight": (3, 48),
        "classifier.bias": (3,)}
    alignment = load_alignment(tmp_path / "align")
    head_in = normed_input_map(alignment.old_profile.final_scale(), alignment.new_profile.final_scale(),
                               pseudo_inverse(alignment.transfer))

    def head(p, x):
        pooled = torch.tanh(x @ p["bert.pooler.dense.weight"].T + p["bert.pooler.dense.bias"])
        return pooled @ p["classifier.weight"].T + p["classifier.bias"]
    x_new = torch.randn(5, 48, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(head(after, x_new), head(before, x_new @ head_in.T), atol=1e-5)
