"""Architecture facts from a model's config and module names, never from its name.

``ModelSpec`` says where the attention and MLP projections of each block live, how many heads and
kv heads there are, and which norm scales sit in front of them. ``layer_weights`` returns one
block's projections in a common head-split layout that the alignment maths works on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loramigrate.errors import UnsupportedArchitectureError
from loramigrate.models import onloaded

# Projection roles → module paths relative to one block, as the supported families name them.
# Llama-like (Llama, Mistral, Qwen2, Gemma, SmolLM2), GPT-NeoX-like (fused qkv), BERT-like, MPNet.
ROLE_PATHS: dict[str, tuple[str, ...]] = {
    "q": ("self_attn.q_proj", "attention.self.query", "attention.attn.q"),
    "k": ("self_attn.k_proj", "attention.self.key", "attention.attn.k"),
    "v": ("self_attn.v_proj", "attention.self.value", "attention.attn.v"),
    "qkv": ("attention.query_key_value",),
    "o": ("self_attn.o_proj", "attention.output.dense", "attention.attn.o", "attention.dense"),
    "gate": ("mlp.gate_proj",),
    "up": ("mlp.up_proj", "intermediate.dense", "mlp.dense_h_to_4h"),
    "down": ("mlp.down_proj", "output.dense", "mlp.dense_4h_to_h"),
}
# Pre-norm scales in front of attention / MLP inputs. Post-norm models (BERT) have none to fold.
NORM_PATHS: dict[str, tuple[str, ...]] = {
    "attn_in": ("input_layernorm",),
    "mlp_in": ("pre_feedforward_layernorm", "post_attention_layernorm"),
}
# Task heads (modules_to_save) that read another head module's output instead of the final-normed hidden
# state, as the supported families name them: BERT's classifier reads the pooler, RoBERTa/MPNet's out_proj
# reads the head's dense layer. Both upstream modules output as many units as the hidden size.
HEAD_INPUTS: dict[str, str] = {"classifier": "pooler.dense", "classifier.out_proj": "classifier.dense"}
ATTENTION_ROLES = ("q", "k", "v", "o")
MLP_ROLES = ("gate", "up", "down")
ROLES = ATTENTION_ROLES + MLP_ROLES


@dataclass(frozen=True)
class ModelSpec:
    """Where things live in one model and how big they are.

    Attributes:
        layers_path: dotted path of the block list, e.g. ``model.layers``.
        modules: role (q, k, v, o, gate, up, down, or qkv when fused) → path inside a block.
        norms: ``attn_in`` / ``mlp_in`` → path of the pre-norm inside a block (empty when post-norm).
        embed_path: dotted path of the input embedding module.
        final_norm: dotted path of the norm after the last block ("" when there is none, e.g. post-norm).
    """

    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab_size: int
    layers_path: str
    modules: dict[str, str]
    norms: dict[str, str] = field(default_factory=dict)
    embed_path: str = ""
    final_norm: str = ""
    tied_embeddings: bool = False
    base_prefix: str = ""  # base_model_prefix: task wrappers (…ForSequenceClassification) nest the base under it
    rope_theta: float | None = None  # None: no rotary embeddings (absolute or relative positions)
    rotary_dim: int | None = None  # leading head dims that rotate (partial rotary in GPT-NeoX)

    @property
    def fused_qkv(self) -> bool:
        return "qkv" in self.modules

    @property
    def gated_mlp(self) -> bool:
        return "gate" in self.modules

    @property
    def group_size(self) -> int:
        """Query heads per kv head."""
        return self.n_heads // self.n_kv_heads

    def module_name(self, layer: int, role: str) -> str:
        """Full dotted module name of a projection (``qkv`` for q/k/v when fused)."""
        if self.fused_qkv and role in ("q", "k", "v"):
            role = "qkv"
        return f"{self.layers_path}.{layer}.{self.modules[role]}"

    def summary(self) -> dict[str, object]:
        return {
            "model_type": self.model_type,
            "layers": self.n_layers,
            "hidden": self.hidden,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate": self.intermediate,
            "vocab": self.vocab_size,
            "fused_qkv": self.fused_qkv,
            "gated_mlp": self.gated_mlp,
            "pre_norm": bool(self.norms),
        }


def _config_int(config: object, *names: str) -> int | None:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def _find_layers(model: nn.Module, n_layers: int) -> str:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name:
            if any(isinstance(m, nn.Linear) for m in module[0].modules()):
                return name
    raise UnsupportedArchitectureError(
        f"no list of {n_layers} transformer blocks found in {type(model).__name__}"
    )


def _find_paths(block: nn.Module, table: dict[str, tuple[str, ...]]) -> dict[str, str]:
    names = dict(block.named_modules())
    return {role: next(p for p in paths if p in names) for role, paths in table.items()
            if any(p in names for p in paths)}


def model_spec(model: nn.Module) -> ModelSpec:
    """Introspect a loaded transformers model.

    Raises:
        UnsupportedArchitectureError: naming the facts (config fields, module paths) not found.
    """
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    facts = {
        "num_hidden_layers": _config_int(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": _config_int(cfg, "hidden_size", "n_embd", "d_model"),
        "num_attention_heads": _config_int(cfg, "num_attention_heads", "n_head"),
        "intermediate_size": _config_int(cfg, "intermediate_size", "n_inner", "ffn_dim"),
        "vocab_size": _config_int(cfg, "vocab_size"),
    }
    missing = [k for k, v in facts.items() if v is None]
    if missing:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: config lacks {', '.join(missing)}; cannot infer the architecture"
        )
    n_layers, hidden, n_heads = facts["num_hidden_layers"], facts["hidden_size"], facts["num_attention_heads"]
    n_kv = _config_int(cfg, "num_key_value_heads", "num_kv_heads") or n_heads
    head_dim = _config_int(cfg, "head_dim") or hidden // n_heads
    layers_path = _find_layers(model, n_layers)
    block = model.get_submodule(layers_path)[0]
    modules = _find_paths(block, ROLE_PATHS)
    if "qkv" in modules:
        modules = {r: p for r, p in modules.items() if r not in ("q", "k", "v")}
    needed = {"o", "up", "down"} | ({"qkv"} if "qkv" in modules else {"q", "k", "v"})
    absent = sorted(needed - set(modules))
    if absent:
        known = ", ".join(n for n, m in block.named_modules() if isinstance(m, nn.Linear))
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: cannot find the {'/'.join(absent)} projection(s) in a block "
            f"(its linear layers are: {known})"
        )
    q_out = (block.get_submodule(modules["q"]).out_features if "q" in modules
             else block.get_submodule(modules["qkv"]).out_features // 3)
    if q_out != n_heads * head_dim:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: q projection has {q_out} outputs, config implies "
            f"{n_heads} heads × {head_dim}"
        )
    norms = _find_paths(block, NORM_PATHS) if "input_layernorm" in dict(block.named_modules()) else {}
    embed = model.get_input_embeddings()
    embed_path = next(n for n, m in model.named_modules() if m is embed)
    stack = layers_path.rsplit(".", 1)[0] if "." in layers_path else ""
    final_norm = next((f"{stack}.{n}".lstrip(".") for n, m in model.get_submodule(stack).named_children()
                       if "norm" in type(m).__name__.lower()), "")
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0)) if theta else None
    return ModelSpec(
        model_type=str(getattr(cfg, "model_type", type(model).__name__)),
        n_layers=n_layers,
        hidden=hidden,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=head_dim,
        intermediate=block.get_submodule(modules["up"]).out_features,
        vocab_size=facts["vocab_size"],
        layers_path=layers_path,
        modules=modules,
        norms=norms,
        embed_path=embed_path,
        final_norm=final_norm,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
        base_prefix=str(getattr(model, "base_model_prefix", "") or ""),
        rope_theta=float(theta) if theta else None,
        rotary_dim=rotary_dim,
    )


def norm_scale(norm: nn.Module, dim: int) -> torch.Tensor:
    """Effective per-channel scale of a LayerNorm/RMSNorm (including Gemma's ``1 + w``).

    Probed functionally with a zero-mean, unit-RMS vector and its negation, so biases cancel and
    no family-specific parameterisation has to be known.
    """
    with onloaded(norm), torch.no_grad():
        p = next(norm.parameters())
        x = torch.ones(dim, dtype=p.dtype, device=p.device)
        x[1::2] = -1
        return ((norm(x) - norm(-x)) / (2 * x)).float()


@dataclass(frozen=True)
class LayerWeights:
    """One block's projections, head-split, float32 on the model's device, norm scales folded into inputs.

    Shapes: q (n_heads, head_dim, hidden), k/v (n_kv_heads, head_dim, hidden),
    o (n_heads, head_dim, hidden) (the transpose of each head's column block),
    gate/up (intermediate, hidden) (gate None when not gated), down (hidden, intermediate).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor
    gate: torch.Tensor | None = None

    def to(self, device: torch.device) -> LayerWeights:
        """The same weights on ``device``: where a device map put two compared layers on different GPUs."""
        return LayerWeights(**{k: None if v is None else v.to(device) for k, v in vars(self).items()})


def _weight(block: nn.Module, path: str) -> torch.Tensor:
    return weight_of(block.get_submodule(path)).float()


def weight_of(module: nn.Module) -> torch.Tensor:
    """A module's weight, detached, also where a device map offloaded it (then a copy on its execution device)."""
    offloaded = module.weight.device.type == "meta"
    with onloaded(module):
        w = module.weight.detach()
        return w.clone() if offloaded else w  # the offloaded copy is accelerate's, dropped after the block


def layer_weights(model: nn.Module, spec: ModelSpec, layer: int, fold_norms: bool = True) -> LayerWeights:
    """Head-split projections of block ``layer`` (see ``LayerWeights`` for shapes)."""
    block = model.get_submodule(spec.layers_path)[layer]
    hd, d = spec.head_dim, spec.hidden
    if spec.fused_qkv:  # GPT-NeoX layout: per head [q | k | v] rows
        qkv = _weight(block, spec.modules["qkv"]).view(spec.n_heads, 3, hd, d)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    else:
        q = _weight(block, spec.modules["q"]).view(spec.n_heads, hd, d)
        k = _weight(block, spec.modules["k"]).view(spec.n_kv_heads, hd, d)
        v = _weight(block, spec.modules["v"]).view(spec.n_kv_heads, hd, d)
    o = _weight(block, spec.modules["o"]).view(d, spec.n_heads, hd).permute(1, 2, 0)
    gate = _weight(block, spec.modules["gate"]) if spec.gated_mlp else None
    up, down = _weight(block, spec.modules["up"]), _weight(block, spec.modules["down"])
    if fold_norms and spec.norms:
        g_attn = norm_scale(block.get_submodule(spec.norms["attn_in"]), d)
        g_mlp = norm_scale(block.get_submodule(spec.norms["mlp_in"]), d)
        q, k, v = q * g_attn, k * g_attn, v * g_attn
        up = up * g_mlp
        gate = gate * g_mlp if gate is not None else None
    return LayerWeights(q=q.contiguous(), k=k.contiguous(), v=v.contiguous(), o=o.contiguous(),
                        up=up, down=down, gate=gate)


def unit_norms(w: LayerWeights) -> dict[str, torch.Tensor]:
    """Squared Frobenius norm of each unit of each projection: a head's rows (q; k and v per kv group), a head's
    columns (o), a neuron's row (gate, up; zeros without a gate) or column (down)."""
    return {"q": w.q.pow(2).sum((1, 2)), "k": w.k.pow(2).sum((1, 2)), "v": w.v.pow(2).sum((1, 2)),
            "o": w.o.pow(2).sum((1, 2)), "gate": w.up.new_zeros(w.up.shape[0]) if w.gate is None else w.gate.pow(2).sum(1),
            "up": w.up.pow(2).sum(1), "down": w.down.pow(2).sum(0)}


def model_profile(model: nn.Module, spec: ModelSpec
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """What transfer needs of a base model without loading it again.

    Returns:
        norms (L, 2, hidden): effective pre-norm scales in front of attention and MLP (ones when
            post-norm); unit_norms, role → (L, units): ``unit_norms`` of each layer with its norm scale folded
            in, so update sizes compare across differently scaled norms and over the units an update reaches;
        final_norm (hidden,): the scale of the norm after the last block, which task heads read through.
    """
    norms = torch.ones(spec.n_layers, 2, spec.hidden)
    units = []
    for i, block in enumerate(model.get_submodule(spec.layers_path)):
        for k, key in enumerate(("attn_in", "mlp_in")):
            if key in spec.norms:
                norms[i, k] = norm_scale(block.get_submodule(spec.norms[key]), spec.hidden).cpu()
        units.append({role: u.cpu() for role, u in unit_norms(layer_weights(model, spec, i)).items()})
    final = (norm_scale(model.get_submodule(spec.final_norm), spec.hidden).cpu() if spec.final_norm
             else torch.ones(spec.hidden))
    return norms, {role: torch.stack([u[role] for u in units]) for role in ROLES}, final


def input_embeddings(model: nn.Module) -> torch.Tensor:
    """The input embedding matrix (vocab, hidden), float32 on the model's device."""
    return weight_of(model.get_input_embeddings()).float()
