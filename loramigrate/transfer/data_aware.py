"""Data-aware transfer: refit the migrated adapter so that each new block reproduces the old adapter's effect.

Weight-space maps between separately trained bases keep little of an adapter's effect, while their
residual streams map well onto each other. So, on the task's own inputs, the adapter of new layer j
(source layer l) is fitted so that the block's output moves by the old adapter's effect, mapped into
the new stream:

    target_j(x) = h_j^new(x) + T_j (h_l^{old+A}(x) − h_l^old(x)),

with T_j the least-squares map from old layer l's outputs to new layer j's outputs on the same tokens.
A new layer without a source layer takes the effect of the last source layer before it, mapped into its
own output stream (so a deeper model's extra top layers still end on the old adapter's final effect);
layers before any source layer keep the effect that reaches them. Layers are fitted in
order with the already migrated ones active, so errors do not compound (sequential reconstruction, as
GPTQ does). Whole-model passes are forward only; a block's fit back-propagates through that block alone.
Saved heads (``modules_to_save`` linears such as a pooler or classifier) are then refitted by ridge
least squares, in forward order, from the migrated model's inputs to the old pair's outputs.

Attention-sink tokens with massive activations (in Qwen2.5 the first token's peak |h| is ~300× a
typical token's) are left out of every per-token fit: one such row outweighs thousands of others in a
least-squares loss, and the fitted maps then carry the adapter's effect into the wrong directions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache

from loramigrate.arch import model_spec
from loramigrate.errors import ArtifactError, ConfigError
from loramigrate.lora import refactor
from loramigrate.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]  # tokenizer output: input_ids, attention_mask, …
Call = tuple[tuple, dict]  # the (args, kwargs) a block was called with


@dataclass(frozen=True)
class FitOptions:
    solver: str = "block"  # a key of SOLVERS
    steps: int = 30  # Adam steps per block (each a full pass over the cached prompts; block solver)
    lr: float = 1e-3
    fit_heads: bool = True


def _hidden(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _replace_hidden(call: Call, hidden: torch.Tensor) -> Call:
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def _run_block(block: nn.Module, call: Call, hidden: torch.Tensor) -> torch.Tensor:
    args, kwargs = _replace_hidden(call, hidden)
    return _hidden(block(*args, **kwargs))


def blocks_of(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a (PEFT-wrapped) model, found from the architecture."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.get_submodule(model_spec(inner).layers_path)


@torch.no_grad()
def block_io(model: nn.Module, batch: Batch) -> tuple[list[Call], list[torch.Tensor]]:
    """Every block's call (args, kwargs) and output on one batch, from one forward pass; the outputs on the batch's
    device (a device map may run blocks elsewhere)."""
    blocks = blocks_of(model)
    device = batch["attention_mask"].device
    calls: list[Call | None] = [None] * len(blocks)
    outs: list[torch.Tensor | None] = [None] * len(blocks)

    def pre(i, _module, args, kwargs):
        # a KV cache would grow with every replay of the block (and chain the fit's graphs)
        kwargs = {k: v for k, v in kwargs.items() if not isinstance(v, Cache)}
        calls[i] = (args, {**kwargs, "use_cache": False} if "use_cache" in kwargs else kwargs)

    def post(i, _module, _args, _kwargs, out):
        outs[i] = _hidden(out).detach().to(device)

    handles = [h for i, b in enumerate(blocks) for h in (
        b.register_forward_pre_hook(lambda m, a, k, i=i: pre(i, m, a, k), with_kwargs=True),
        b.register_forward_hook(lambda m, a, k, o, i=i: post(i, m, a, k, o), with_kwargs=True))]
    try:
        model(**batch)
    finally:
        for h in handles:
            h.remove()
    for i, o in enumerate(outs):
        if o is None or not torch.isfinite(o).all():
            raise ArtifactError(f"non-finite (NaN/inf) activations in block {i}; the model or adapter is broken")
    return calls, outs


def _tokens(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) → (n, d): the positions the attention mask keeps."""
    return x[mask.bool()]


SINK_RATIO = 20.0  # a token whose peak |h| in some layer exceeds this × the median token's is a sink


def sink_tokens(streams: list[list[torch.Tensor]], masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per batch, the kept positions that are attention sinks with massive activations in some layer
    of ``streams`` (per layer, a (B, T, d) tensor per batch)."""
    sinks = [torch.zeros_like(m, dtype=torch.bool) for m in masks]
    for layer in streams:
        peaks = [h.abs().amax(-1) for h in layer]
        median = torch.cat([p[m.bool()] for p, m in zip(peaks, masks, strict=True)]).median()
        for s, p, m in zip(sinks, peaks, masks, strict=True):
            s |= (p > SINK_RATIO * median) & m.bool()
    return sinks


def ridge_path(x: torch.Tensor, y: torch.Tensor, ridges: tuple[float, ...], bias: bool = False) -> list[torch.Tensor]:
    """W (d_y, d_x [+1]) minimising ‖x Wᵀ − y‖² + λ‖W‖² for each λ = ridge × mean diagonal of xᵀx, from one
    eigendecomposition in float64: of xᵀx, or of the n × n x xᵀ when there are fewer rows than inputs."""
    x = x.double()
    if bias:
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    n, d = x.shape
    scale, y = float(x.pow(2).sum()) / d, y.double()
    if n < d:  # dual: W = yᵀ (x xᵀ + λI)⁻¹ x
        evals, u = torch.linalg.eigh(x @ x.T)
        uy = u.T @ y
        return [((u @ (uy / (evals + r * scale + 1e-12)[:, None])).T @ x).float() for r in ridges]
    evals, u = torch.linalg.eigh(x.T @ x)
    uxy = u.T @ (x.T @ y)
    return [(u @ (uxy / (evals + r * scale + 1e-12)[:, None])).T.float() for r in ridges]


def ridge_fit(x: torch.Tensor, y: torch.Tensor, ridge: float, bias: bool = False) -> torch.Tensor:
    return ridge_path(x, y, (ridge,), bias)[0]


RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def apply_fit(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x Wᵀ, with the bias column of a ``ridge_fit(..., bias=True)`` when W has one more column than x."""
    return x @ w[:, : x.shape[1]].T + (w[:, -1] if w.shape[1] > x.shape[1] else 0)


def r2(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Explained fraction of y's variance around its mean (1: exact, 0: no better than the mean)."""
    return float(1 - (pred - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum().clamp_min(1e-30))


def ridge_select(x: torch.Tensor, y: torch.Tensor, bias: bool = False, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """``ridge_fit`` with the ridge that predicts a held-out fifth of the rows best, refitted on all rows.

    Few rows against wide inputs (a pooler sees one row per prompt) would otherwise be interpolated,
    not fitted. Returns W and {ridge, heldout_r2}.
    """
    x, y = x.float(), y.float()  # rows of a half-precision model
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    cut = max(1, x.shape[0] // 5)
    test, fit = order[:cut], order[cut:]
    fits = ridge_path(x[fit], y[fit], RIDGES, bias)
    scores = {lam: r2(apply_fit(w, x[test]), y[test]) for lam, w in zip(RIDGES, fits, strict=True)}
    best = max(scores, key=scores.get)
    return ridge_fit(x, y, best, bias), {"ridge": best, "heldout_r2": round(scores[best], 4)}


def old_effects(old_model: nn.Module, batches: list[Batch], layers: set[int]) -> tuple[dict, dict]:
    """Per batch and old layer in ``layers``: the adapter's effect h^{old+A} − h^old (float32: in a half-precision
    model the difference of two nearby streams would keep few bits) and the plain h^old."""
    effects: dict[int, list[torch.Tensor]] = {lay: [] for lay in layers}
    plain: dict[int, list[torch.Tensor]] = {lay: [] for lay in layers}
    for batch in batches:
        _, with_adapter = block_io(old_model, batch)
        with old_model.disable_adapter():
            _, without = block_io(old_model, batch)
        for lay in layers:
            effects[lay].append(with_adapter[lay].float() - without[lay].float())
            plain[lay].append(without[lay])
    return effects, plain


def _lora_params(block: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in block.named_parameters() if "lora_" in n]


def _masked_sq(diff: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (diff.float().pow(2).sum(-1) * mask).sum()  # float32 sums of squares, whatever the model's dtype


@dataclass
class BlockFit:
    """One block's fitting problem, per batch: its calls, the migrated inputs, the targets, the new
    base's own output and the kept positions; ``writers`` are the block-relative paths of its adapted
    residual writers (o, down), in forward order."""

    block: nn.Module
    calls: list[Call]
    inputs: list[torch.Tensor]
    targets: list[torch.Tensor]
    base_out: list[torch.Tensor]
    masks: list[torch.Tensor]
    writers: list[str]

    def batches(self):
        return zip(self.calls, self.inputs, self.targets, self.masks, strict=True)

    def energy(self) -> float:
        return max(sum(float(_masked_sq(t - b, m)) for t, b, m in zip(self.targets, self.base_out, self.masks,
                                                                         strict=True)), 1e-30)

    @torch.no_grad()
    def error(self) -> float:
        return sum(float(_masked_sq(_run_block(self.block, c, x) - t, m)) for c, x, t, m in self.batches())


def solve_adam(fit: BlockFit, opts: FitOptions) -> None:
    """``opts.steps`` full-batch Adam steps on every LoRA factor of the block (backprop through it alone),
    keeping the best factors seen: Adam jitters near an optimum."""
    params = _lora_params(fit.block)
    energy = fit.energy()
    opt = torch.optim.Adam(params, lr=opts.lr)
    best, best_state = float("inf"), None
    for _ in range(opts.steps):
        opt.zero_grad()
        loss = 0.0
        for c, x, t, m in fit.batches():
            part = _masked_sq(_run_block(fit.block, c, x) - t, m)
            (part / energy).backward()
            loss += float(part.detach())
        if loss < best:  # the loss of the factors before this step
            best, best_state = loss, [p.detach().clone() for p in params]
        opt.step()
    if best_state is not None and fit.error() > best:
        _restore(params, best_state)


def reduced_rank_fit(z: torch.Tensor, y: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors (b: d_out × r, a: r × d_in) of the rank-r W minimising ‖z Wᵀ − y‖² (reduced-rank
    regression): the ridge least-squares W projected onto the top-r directions of its fitted values."""
    w, _ = ridge_select(z, y)
    v = torch.linalg.svd((z @ w.T).double(), full_matrices=False).Vh[:rank].T.float()
    return v, v.T @ w


def _writer_io(fit: BlockFit, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the block's module ``path`` and the block's outputs, over the kept positions."""
    seen: list[torch.Tensor] = []
    handle = fit.block.get_submodule(path).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    outs = []
    try:
        with torch.no_grad():
            for c, x, _t, m in fit.batches():
                outs.append(_tokens(_run_block(fit.block, c, x), m))
                seen[-1] = _tokens(seen[-1], m)
    finally:
        handle.remove()
    return torch.cat(seen).float(), torch.cat(outs).float()


def solve_rrr(fit: BlockFit, opts: FitOptions) -> None:
    """Closed form, forward passes only: each residual writer (o, then down) takes the rank-r map from
    its inputs to what the block's output still lacks, the others keep their weight-space transfer.
    Exact for down in a pre-norm block; o ignores how the MLP reacts to its change."""
    target = torch.cat([_tokens(t, m) for t, m in zip(fit.targets, fit.masks, strict=True)])
    for path in fit.writers:
        lora = fit.block.get_submodule(path)
        a, b, scale = lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"]
        z, out = _writer_io(fit, path)
        current = scale * (z @ a.detach().T) @ b.detach().T
        v, w = reduced_rank_fit(z, target - out + current, a.shape[0])
        b_k, a_k, _ = refactor(v, w / scale, rank=a.shape[0])
        with torch.no_grad():
            b.copy_(b_k.to(b.dtype))
            a.copy_(a_k.to(a.dtype))


SOLVERS = {"block": solve_adam, "rrr": solve_rrr}


def _restore(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, value in zip(params, saved, strict=True):
            p.copy_(value)


def fit_block(fit: BlockFit, opts: FitOptions) -> tuple[float, float]:
    """Run the solver, never ending worse than the start; returns the effect R² before and after.

    R² = 1 − ‖out − target‖² / ‖target − base_out‖² over the kept positions: 1 means the block moves
    its output exactly by the target effect, 0 no better than no adapter at all.
    """
    params = _lora_params(fit.block)
    energy, first = fit.energy(), fit.error()
    start = [p.detach().clone() for p in params]
    SOLVERS[opts.solver](fit, opts)
    last = fit.error()
    if last > first:
        _restore(params, start)
        last = first
    return 1 - first / energy, 1 - last / energy


def migrate_layers(new_model: nn.Module, batches: list[Batch], layer_map: list[int | None],
                   effects: dict[int, list[torch.Tensor]], old_plain: dict[int, list[torch.Tensor]],
                   opts: FitOptions, progress: ProgressFn = no_progress) -> tuple[list[dict], int]:
    """Fit every adapted block of ``new_model`` (a PEFT model, trained in place), in order.

    Returns one report row per new layer (source layer, T_j fit R², effect R² before and after) and the
    number of sink tokens left out of the fits.
    """
    blocks = blocks_of(new_model)
    spec = model_spec(new_model.get_base_model())
    if opts.solver == "rrr" and not spec.norms:
        raise ConfigError("the rrr solver needs pre-norm blocks (o/down write into the residual stream); "
                          f"{spec.model_type} is post-norm: use the block solver")
    writers = [spec.modules[r] for r in ("o", "down") if r in spec.modules]
    masks = [b["attention_mask"].float() for b in batches]
    with new_model.disable_adapter():
        ios = [block_io(new_model, b) for b in batches]
    new_streams = [[io[1][j] for io in ios] for j in range(len(blocks))]
    sinks = sink_tokens([*new_streams, *old_plain.values()], masks)
    masks = [m * ~s for m, s in zip(masks, sinks, strict=True)]
    calls = [[io[0][j] for io in ios] for j in range(len(blocks))]
    base_in = [_hidden_input(io[0][0]) for io in ios]
    x_plain, x_mig = list(base_in), list(base_in)
    report = []
    for p in new_model.parameters():
        p.requires_grad_(False)
    src = None
    for j, block in enumerate(blocks):
        base_out = new_streams[j]
        src = layer_map[j] if layer_map[j] is not None else src  # unmapped: the last source layer above
        row: dict = {"layer": j, "source_layer": layer_map[j], "effect_of_old_layer": src}
        if src is not None:
            t, fit = ridge_select(torch.cat([_tokens(h, m) for h, m in zip(old_plain[src], masks, strict=True)]),
                                  torch.cat([_tokens(h, m) for h, m in zip(base_out, masks, strict=True)]))
            row.update(stream_fit_r2=fit["heldout_r2"], stream_ridge=fit["ridge"])
            targets = [o + e @ t.T for o, e in zip(base_out, effects[src], strict=True)]
        else:
            targets = [o + (xm - xp) for o, xm, xp in zip(base_out, x_mig, x_plain, strict=True)]
        params = _lora_params(block)
        if params:
            for p in params:
                p.requires_grad_(True)
            fit = BlockFit(block, calls[j], x_mig, targets, base_out, masks,
                           [w for w in writers if hasattr(block.get_submodule(w), "lora_A")])
            with torch.enable_grad():
                before, after = fit_block(fit, opts)
            for p in params:
                p.requires_grad_(False)
            row.update(effect_r2_before=round(before, 4), effect_r2_after=round(after, 4))
        with torch.no_grad():
            x_mig = [_run_block(block, c, x) for c, x in zip(calls[j], x_mig, strict=True)]
        x_plain = base_out
        report.append(row)
        progress("data-aware transfer", j + 1, len(blocks))
    return report, int(sum(s.sum() for s in sinks))


def _hidden_input(call: Call) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def _linear_io(model: nn.Module, name: str, batches: list[Batch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and outputs of the linear ``name`` over all batches, as (n, in) and (n, out) rows on the batches'
    device."""
    xs, ys = [], []

    def hook(_m, args, out):
        mask = current["mask"]
        x, out = args[0].to(mask.device), out.to(mask.device)
        if x.dim() == 3:  # per token: keep the positions the mask keeps
            x, out = x[mask.bool()], out[mask.bool()]
        xs.append(x.reshape(-1, x.shape[-1]).float())
        ys.append(out.reshape(-1, out.shape[-1]).float())

    current: dict = {}
    handle = model.get_submodule(name).register_forward_hook(hook)
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            model(**batch)
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys)


def refit_heads(old_model: nn.Module, new_model: nn.Module, heads: list[str], batches: list[Batch],
                max_out: int) -> dict[str, dict]:
    """Ridge-refit each saved linear head, in forward order, to reproduce the old pair's outputs.

    Heads wider than ``max_out`` outputs (vocabulary-sized LM heads) keep their weight-space map.
    Returns per head the fit R² of its outputs before and after.
    """
    report = {}
    for name in heads:
        module = new_model.get_submodule(name)
        weight = _head_weight(module)
        if weight is None or weight.shape[0] > max_out:
            continue
        _, target = _linear_io(old_model, name, batches)
        x, y = _linear_io(new_model, name, batches)
        w, fit = ridge_select(x, target, bias=True)
        with torch.no_grad():
            weight.copy_(w[:, :-1].to(weight.dtype))
            bias = active_copy(module).bias
            if bias is not None:
                bias.copy_(w[:, -1].to(bias.dtype))
        # its own inputs do not change with its refit, so the fitted outputs need no second forward pass
        report[name] = {"output_r2_before": round(r2(y, target), 4),
                        "output_r2_after": round(r2(apply_fit(w, x), target), 4), **fit}
    return report


def active_copy(module: nn.Module) -> nn.Module:
    """The trained copy inside PEFT's modules_to_save wrapper (its public ``modules_to_save`` dict)."""
    copies = getattr(module, "modules_to_save", None)
    return copies["default"] if copies is not None and "default" in copies else module


def _head_weight(module: nn.Module) -> torch.Tensor | None:
    inner = active_copy(module)
    return inner.weight if isinstance(inner, nn.Linear) else None


def data_aware_transfer(old_model: nn.Module, new_model: nn.Module, batches: list[Batch], layer_map: list[int | None],
                        heads: list[str], opts: FitOptions, max_head_out: int,
                        progress: ProgressFn = no_progress) -> dict:
    """Refit ``new_model``'s adapter (loaded with the weight-space transfer) in place; returns the report."""
    sources = {s for s in layer_map if s is not None}
    effects, plain = old_effects(old_model, batches, sources)
    layers, sinks = migrate_layers(new_model, batches, layer_map, effects, plain, opts, progress)
    del effects, plain
    head_report = refit_heads(old_model, new_model, heads, batches, max_head_out) if opts.fit_heads else {}
    return {"layers": layers, "heads": head_report, "sink_tokens_left_out": sinks}

