"""Function-preserving shape changes of a tiny untied Llama: new bases that compute exactly the old
function with more kv heads, more heads, a larger head_dim, a wider residual stream or rotated rotary pairs.

Each returns a new model whose logits equal the old one's (up to float error), so a transferred
adapter must reproduce the old pair's logits on it. Tested in tests/test_function_preserving.py.
"""

from __future__ import annotations

import torch

from tests.helpers import build

_ATTN = "model.layers.{}.self_attn.{}_proj.weight"


def reshaped(model, state: dict[str, torch.Tensor], **changes):
    """A model of ``model``'s family with ``changes`` to its config, loaded with ``state`` (strict)."""
    cfg = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
    new = build(type(model.config)(**{**cfg, **changes}))
    new.load_state_dict(state)
    return new.eval()


def _heads(w: torch.Tensor, hd: int) -> torch.Tensor:
    return w.view(-1, hd, w.shape[-1])


def replicate_kv_heads(model, n_kv: int):
    """Each old kv head copied into n_kv / n_kv_old consecutive new kv heads (GQA → more kv heads; with
    n_kv = n_heads, MHA). Query head h keeps reading the same keys and values."""
    cfg = model.config
    rep, hd = n_kv // cfg.num_key_value_heads, cfg.head_dim
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.num_hidden_layers):
        for role in ("k", "v"):
            key = _ATTN.format(i, role)
            state[key] = _heads(state[key], hd).repeat_interleave(rep, 0).reshape(-1, cfg.hidden_size)
    return reshaped(model, state, num_key_value_heads=n_kv)


def prepend_zero_heads(model, n_kv_groups: int, live: float = 0.0, seed: int = 0):
    """``n_kv_groups`` new kv groups of heads in front of the old ones, with zero output columns: they
    write nothing, so the old heads (now shifted) carry the whole function. Their q/k/v rows are zero,
    or random of scale ``live`` (heads that compute but are silenced)."""
    cfg = model.config
    hd, d = cfg.head_dim, cfg.hidden_size
    gs = cfg.num_attention_heads // cfg.num_key_value_heads
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.num_hidden_layers):
        for role, n in (("q", n_kv_groups * gs), ("k", n_kv_groups), ("v", n_kv_groups)):
            key = _ATTN.format(i, role)
            state[key] = torch.cat([live * torch.randn(n * hd, d, generator=g), state[key]])
        key = _ATTN.format(i, "o")
        state[key] = torch.cat([torch.zeros(d, n_kv_groups * gs * hd), state[key]], 1)
    return reshaped(model, state, num_attention_heads=cfg.num_attention_heads + n_kv_groups * gs,
                    num_key_value_heads=cfg.num_key_value_heads + n_kv_groups)


def append_silent_neurons(model, n: int, scale: float = 0.2, seed: int = 0):
    """``n`` new MLP neurons with random gate/up rows and zero down columns: they compute but write nothing."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.num_hidden_layers):
        mlp = f"model.layers.{i}.mlp.{{}}_proj.weight"
        for role in ("gate", "up"):
            w = state[mlp.format(role)]
            state[mlp.format(role)] = torch.cat([w, scale * torch.randn(n, w.shape[1], generator=g)])
        down = state[mlp.format("down")]
        state[mlp.format("down")] = torch.cat([down, torch.zeros(down.shape[0], n)], 1)
    return reshaped(model, state, intermediate_size=cfg.intermediate_size + n)


def rope_embedding(hd_old: int, factor: int) -> torch.Tensor:
    """(hd_new, hd_old) 0/1 map sending rotary pair i (dims i, i + hd/2) to pair factor·i: at one θ,
    θ^(-2·factor·i / (factor·hd)) is the old pair's frequency, so positions rotate exactly as before."""
    hd_new, half = factor * hd_old, hd_old // 2
    m = torch.zeros(hd_new, hd_old)
    for i in range(half):
        m[factor * i, i] = m[factor * i + hd_new // 2, i + half] = 1.0
    return m


def pair_rotations(angles: torch.Tensor) -> torch.Tensor:
    """(..., hd, hd) rotations of each rotary pair (dims i, i + hd/2) by ``angles`` (..., hd/2)."""
    half = angles.shape[-1]
    cos, sin = angles.cos(), angles.sin()
    m = torch.zeros(*angles.shape[:-1], 2 * half, 2 * half)
    i = torch.arange(half)
    m[..., i, i], m[..., i, i + half], m[..., i + half, i], m[..., i + half, i + half] = cos, -sin, sin, cos
    return m


def rotate_rotary_pairs(model, seed: int = 0):
    """Each rotary pair of a kv group's q and k rows rotated by a random angle (per layer, kv group and
    frequency): a 2×2 rotation commutes with RoPE's, and q·k sees RᵀR = I, so scores are unchanged.

    Returns:
        the new model and the angles (layers, n_kv_heads, head_dim / 2).
    """
    cfg = model.config
    hd, d, gs = cfg.head_dim, cfg.hidden_size, cfg.num_attention_heads // cfg.num_key_value_heads
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(cfg.num_hidden_layers, cfg.num_key_value_heads, hd // 2, generator=g) * 2 - 1) * torch.pi
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.num_hidden_layers):
        rot = pair_rotations(angles[i])
        for role, per_group in (("q", rot.repeat_interleave(gs, 0)), ("k", rot)):
            key = _ATTN.format(i, role)
            state[key] = (per_group @ _heads(state[key], hd)).reshape(-1, d)
    return reshaped(model, state), angles


def grow_head_dim(model, factor: int, seed: int = 0):
    """head_dim × ``factor``: q/k rows padded by ``rope_embedding`` (q scaled by √factor, since scores are
    divided by √head_dim), v rows and o columns through a random orthonormal embedding per head."""
    cfg = model.config
    hd, d = cfg.head_dim, cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    rope = rope_embedding(hd, factor)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i in range(cfg.num_hidden_layers):
        emb = torch.linalg.qr(torch.randn(cfg.num_key_value_heads, factor * hd, hd, generator=g))[0]
        q, k, v = (_heads(state[_ATTN.format(i, r)], hd) for r in "qkv")
        state[_ATTN.format(i, "q")] = (factor**0.5 * rope @ q).reshape(-1, d)
        state[_ATTN.format(i, "k")] = (rope @ k).reshape(-1, d)
        state[_ATTN.format(i, "v")] = (emb @ v).reshape(-1, d)
        o = state[_ATTN.format(i, "o")].view(d, -1, hd)  # (d, heads, hd): columns per head
        per_head = emb.repeat_interleave(cfg.num_attention_heads // cfg.num_key_value_heads, 0)
        state[_ATTN.format(i, "o")] = torch.einsum("dha,hba->dhb", o, per_head).reshape(d, -1)
    return reshaped(model, state, head_dim=factor * hd)


def widen_hidden(model, d_new: int, seed: int = 0, spread: float = 0.5):
    """Residual stream embedded as x_new = c·P·x_old, P (d_new, d_old) with orthonormal columns, new
    norm scales random.

    RMSNorm divides by √(mean of x² over d): P alone would shrink that mean by d_old/d_new and change
    every normalised input, so the stream is scaled by c = √(d_new/d_old), which keeps the mean (eps
    included). Readers behind a norm (q/k/v, gate/up, lm_head) become W·diag(g_old)·Pᵀ·diag(1/g_new)/c,
    writers (embeddings, o, down) c·P·W.
    """
    cfg = model.config
    d_old = cfg.hidden_size
    g = torch.Generator().manual_seed(seed)
    p = torch.linalg.qr(torch.randn(d_new, d_old, generator=g))[0]
    c = (d_new / d_old) ** 0.5
    state = {k: v.clone() for k, v in model.state_dict().items()}
    readers = {"model.norm.weight": ["lm_head.weight"]}
    for i in range(cfg.num_hidden_layers):
        pre = f"model.layers.{i}."
        readers[pre + "input_layernorm.weight"] = [pre + f"self_attn.{r}_proj.weight" for r in "qkv"]
        readers[pre + "post_attention_layernorm.weight"] = [pre + f"mlp.{r}_proj.weight" for r in ("gate", "up")]
        for key in (pre + "self_attn.o_proj.weight", pre + "mlp.down_proj.weight"):
            state[key] = c * p @ state[key]
    for norm, keys in readers.items():
        g_old, g_new = state[norm], 1 + spread * torch.rand(d_new, generator=g)
        for key in keys:
            state[key] = state[key] * g_old @ p.T / g_new / c
        state[norm] = g_new
    state["model.embed_tokens.weight"] = c * state["model.embed_tokens.weight"] @ p.T
    return reshaped(model, state, hidden_size=d_new, head_dim=cfg.head_dim)
