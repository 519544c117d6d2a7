"""Test kit: tiny random models of each family, and upgrades with a known ground truth.

Everything is built in the test session (no network, well under a second per model).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = (
    "the a of and to in is it that was for on are with as his they be at one have this from or had by "
    "word but what some we can out other were all there when up use your how said an each she which do "
    "their time if will way about many then them write would like so these her long make thing see him "
    "two has look more day could go come did number sound no most people my over know water than call "
    "first who may down side been now find any new work part take get place made live where after back"
).split()

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "neox", "bert")


CUES = ("water", "people", "number")


def cue_rows(rng, n: int) -> list[dict]:
    """Text/label rows whose label is the cue word the text holds: learnable by a tiny random encoder."""
    fillers = [w for w in WORDS if w not in CUES]
    rows = []
    for _ in range(n):
        label = rng.choice(CUES)
        words = rng.choices(fillers, k=5) + [label]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def make_tokenizer(words: list[str], pad: str = "[PAD]", unk: str = "[UNK]") -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate([pad, unk, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad)


def tiny_config(family: str, *, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                intermediate: int = 64, vocab: int = len(WORDS) + 2, head_dim: int | None = None,
                init: float = 0.02):
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=intermediate, vocab_size=vocab, initializer_range=init)
    hd = {"head_dim": head_dim} if head_dim else {}
    if family == "llama":
        return transformers.LlamaConfig(num_key_value_heads=kv_heads, tie_word_embeddings=False, **hd, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(num_key_value_heads=kv_heads, tie_word_embeddings=True, **hd, **common)
    if family == "mistral":
        return transformers.MistralConfig(num_key_value_heads=kv_heads, **hd, **common)
    if family == "gemma":
        return transformers.GemmaConfig(num_key_value_heads=kv_heads, head_dim=head_dim or hidden // heads,
                                        **common)
    if family == "neox":
        return transformers.GPTNeoXConfig(**common)
    if family == "bert":
        return transformers.BertConfig(**common)
    raise ValueError(family)


def build(config, seed: int = 0):
    torch.manual_seed(seed)
    if isinstance(config, transformers.BertConfig):
        model = transformers.BertModel(config, add_pooling_layer=False)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.eval()


def randomize_norms(model, seed: int = 1, spread: float = 0.5) -> None:
    """Non-unit norm scales, so tests notice when norm folding is missing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and name.endswith("weight"):
                p.copy_(p + spread * torch.rand(p.shape, generator=g))


def save(model, tok, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_tiny(family: str, path: Path, seed: int = 0, **kw) -> Path:
    """A saved tiny model of ``family`` with its word-level tokenizer."""
    return save(build(tiny_config(family, **kw), seed), make_tokenizer(WORDS), path)


@dataclass(frozen=True)
class Upgrade:
    """Ground truth of a synthetic upgrade, in the alignment's conventions."""

    layer_map: list[int | None]  # per new layer: old layer or None
    head_map: list[int]  # per new query head: old head (the same in every layer)
    neuron_map: list[int]  # per new neuron: old neuron
    rotation: torch.Tensor  # R (d, d): h_new = R h_old


def fold_norms(model) -> None:
    """Fold RMSNorm scales into the following linear layers and set them to one (function kept)."""
    with torch.no_grad():
        for layer in model.model.layers:
            for norm, linears in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj)),
                                  (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                for lin in linears:
                    lin.weight.mul_(norm.weight[None, :])
                norm.weight.fill_(1.0)
        model.lm_head.weight.mul_(model.model.norm.weight[None, :])
        model.model.norm.weight.fill_(1.0)


def permute_and_rotate(model, seed: int = 0, rotate: bool = True) -> Upgrade:
    """In place: permute kv groups, heads within groups, MLP neurons; rotate the residual stream.

    Only for untied Llama-like models. The function is preserved exactly (up to float error).
    """
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    gs, hd, d = n_heads // n_kv, cfg.hidden_size // n_heads, cfg.hidden_size
    kv_perm = torch.randperm(n_kv, generator=g).tolist()
    within = [torch.randperm(gs, generator=g).tolist() for _ in range(n_kv)]
    head_map = [kv_perm[h // gs] * gs + within[h // gs][h % gs] for h in range(n_heads)]
    neuron_map = torch.randperm(cfg.intermediate_size, generator=g).tolist()
    rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0] if rotate else torch.eye(d)
    fold_norms(model)

    def rows(w: torch.Tensor, perm: list[int], block: int) -> torch.Tensor:
        return w.view(-1, block, *w.shape[1:])[perm].reshape(w.shape)

    with torch.no_grad():
        for layer in model.model.layers:
            at, mlp = layer.self_attn, layer.mlp
            at.q_proj.weight.copy_(rows(at.q_proj.weight, head_map, hd) @ rot.T)
            for proj in (at.k_proj, at.v_proj):
                proj.weight.copy_(rows(proj.weight, kv_perm, hd) @ rot.T)
            for proj, perm in ((at.q_proj, head_map), (at.k_proj, kv_perm), (at.v_proj, kv_perm)):
                if proj.bias is not None:
                    proj.bias.copy_(rows(proj.bias, perm, hd))
            o = at.o_proj.weight.view(d, n_heads, hd)[:, head_map].reshape(d, d)
            at.o_proj.weight.copy_(rot @ o)
            mlp.gate_proj.weight.copy_(mlp.gate_proj.weight[neuron_map] @ rot.T)
            mlp.up_proj.weight.copy_(mlp.up_proj.weight[neuron_map] @ rot.T)
            mlp.down_proj.weight.copy_(rot @ mlp.down_proj.weight[:, neuron_map])
        emb = model.model.embed_tokens.weight
        emb.copy_(emb @ rot.T)
        model.lm_head.weight.copy_(model.lm_head.weight @ rot.T)
    return Upgrade(layer_map=list(range(cfg.num_hidden_layers)), head_map=head_map,
                   neuron_map=neuron_map, rotation=rot)


def insert_layers(model, positions: list[int], seed: int = 0, scale: float = 0.3):
    """A deeper copy of ``model`` with a new random block before each old index in ``positions``.

    Inserted blocks write ``scale`` × their output into the residual stream, so later blocks see a
    perturbed but recognisable input. Returns (new model, layer_map per new layer).
    """
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
    n_old = model.config.num_hidden_layers
    order: list[int | None] = []
    for i in range(n_old):
        order += [None] * positions.count(i) + [i]
    new_cfg = type(model.config)(**{**cfg, "num_hidden_layers": len(order)})
    new = build(new_cfg, seed=seed + 100)
    state = {k: v for k, v in model.state_dict().items() if ".layers." not in k}
    layers_path = "model.layers."
    for j, i in enumerate(order):
        src = model.model.layers[i] if i is not None else new.model.layers[j]
        for k, v in src.state_dict().items():
            w = v.clone()
            if i is None and any(s in k for s in ("o_proj.weight", "down_proj.weight")):
                w = w * scale
            state[f"{layers_path}{j}.{k}"] = w
    new.load_state_dict(state)
    return new.eval(), order


def make_lora(model_dir: Path, out: Path, targets: list[str], r: int = 4, alpha: float = 8, seed: int = 0,
              **lora_kw) -> Path:
    """A real PEFT LoRA directory for the model in ``model_dir``, with non-zero A and B."""
    from peft import LoraConfig, get_peft_model

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False, **lora_kw)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    peft_model.save_pretrained(out)
    return out


def finetuned(cfg, out: Path, **kwargs) -> Path:
    """``run_finetune`` into ``out``, returned (the runner itself returns whether it ran)."""
    from loramigrate.finetune.runner import run_finetune

    run_finetune(cfg, out, **kwargs)
    return Path(out)


def run_script(script: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>`` with bash, with this interpreter's ``loramigrate`` first on PATH (pytest may
    run from a venv that is not activated)."""
    path = Path(__file__).parent.parent / "scripts" / script
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    return subprocess.run(["bash", str(path), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env=env)


HOLD_LOCK = """
import sys, time
from pathlib import Path
from loramigrate.artifacts import output_lock
with output_lock(Path(sys.argv[1])):
    print("locked", flush=True)
    time.sleep(600)
"""


def python_env() -> dict[str, str]:
    """The environment of a ``python -c`` subprocess that imports the loramigrate these tests run."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), *sys.path])}


def lock_holder(out: Path) -> subprocess.Popen:
    """Another process holding the output lock of ``out`` (the lock is re-entrant within this one)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], stdout=subprocess.PIPE, text=True,
                            env=python_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc
