"""The align stage's core: two loaded models + calibration text → ``Alignment``. No paths, no UI."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from loramigrate.align.activation_stats import HeadOutputStats, NeuronSample, captured_inputs
from loramigrate.align.activations import activation_rows, calibration_batches, residual_streams
from loramigrate.align.cka import make_cka
from loramigrate.align.head_match import HEAD_MATCHERS, head_similarity, head_space_maps
from loramigrate.align.layer_map import LAYER_MAPPERS
from loramigrate.align.mlp_map import MLP_MATCHERS, neuron_similarity, resolve_mlp_matcher
from loramigrate.align.transfer_matrix import TransferStats, shared_tokens
from loramigrate.alignment import Alignment, LayerAlignment, ModelProfile
from loramigrate.arch import ModelSpec, input_embeddings, layer_weights, model_profile, model_spec
from loramigrate.config import AlignConfig
from loramigrate.errors import ArtifactError
from loramigrate.models import input_device
from loramigrate.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)
_ROWS = 8192  # embedding rows per float64 chunk


def layer_similarity(old: nn.Module, new: nn.Module, batches: Iterable[tuple[dict, dict]], *,
                     old_spec: ModelSpec, new_spec: ModelSpec, pooled: bool, row_norm: bool,
                     estimator: str, chunk: int, max_bytes: int, total: int,
                     progress: ProgressFn = no_progress) -> tuple[torch.Tensor, str, int]:
    """Old×new linear CKA over every layer pair, one forward pass per model and batch.

    Returns:
        (L_old, L_new) CKA, the estimator used, the number of rows (tokens or sequences).
    """
    dev = input_device(new)  # where the accumulators work
    name, acc = make_cka(estimator, old_spec.n_layers, old_spec.hidden, new_spec.n_layers,
                         new_spec.hidden, chunk, max_bytes, device=dev)
    rows = 0
    for i, (enc_old, enc_new) in enumerate(batches):
        x = activation_rows(residual_streams(old, enc_old, dev)[1:], enc_old["attention_mask"], pooled, row_norm)
        y = activation_rows(residual_streams(new, enc_new, dev)[1:], enc_new["attention_mask"], pooled, row_norm)
        acc.update(x, y)
        rows += x.shape[1]
        progress("calibration", i + 1, total)
    if rows < 4:
        raise ArtifactError(f"calibration gave {rows} rows; CKA needs at least 4 (give more text)")
    dims = max(old_spec.hidden, new_spec.hidden)
    if rows < dims:
        log.warning("CKA on %d %s rows in up to %d dimensions is biased towards 1 and separates layers poorly; "
                    "give more calibration text (--calib, --max-tokens)%s", rows, "pooled" if pooled else "token",
                    dims, " or a shorter --seq-len" if pooled else "")
    return acc.result(), name, rows


def fit_transfer(old: nn.Module, new: nn.Module, old_vocab: dict[str, int], new_vocab: dict[str, int],
                 method: str, ridge: float) -> tuple[torch.Tensor, dict]:
    """Fit T on the input embeddings of shared tokens; returns T and what to report about it."""
    e_old, e_new = input_embeddings(old), input_embeddings(new)
    ids_old, ids_new = shared_tokens(old_vocab, new_vocab, e_old.shape[0], e_new.shape[0])
    stats = TransferStats(e_old.shape[1], e_new.shape[1], e_new.device)
    for rows_old, rows_new in zip(ids_old.split(_ROWS), ids_new.split(_ROWS), strict=True):
        stats.update(e_old[rows_old].to(e_new.device), e_new[rows_new])  # chunks: float64 150k-token tables add GBs
    t, cosine = stats.fit(method, ridge)
    info = {
        "shared_tokens": {
            "count": len(ids_old),
            "old_vocab": len(old_vocab),
            "new_vocab": len(new_vocab),
            "coverage_old": round(len(ids_old) / max(len(old_vocab), 1), 4),
            "coverage_new": round(len(ids_new) / max(len(new_vocab), 1), 4),
        },
        "transfer_fit_cosine": round(cosine, 4),
    }
    return t, info


@dataclass
class SecondPass:
    """What the activation pass over mapped layer pairs produced, per new layer."""

    transfers: dict[int, tuple[torch.Tensor, float]] = field(default_factory=dict)  # T_j and its fit cosine
    heads: dict[int, HeadOutputStats] = field(default_factory=dict)
    neurons: dict[int, NeuronSample] = field(default_factory=dict)


def activation_pass(old: nn.Module, new: nn.Module, batches: list[tuple[dict, dict]], *, old_spec: ModelSpec,
                    new_spec: ModelSpec, layer_map: list[int | None], pooled: bool, row_norm: bool,
                    transfers: bool, heads: bool, neurons: int, method: str, ridge: float,
                    progress: ProgressFn = no_progress) -> SecondPass:
    """One more forward pass per model over the mapped layer pairs (the layer map is known only after
    the CKA pass): residual streams entering each block for per-layer transfer matrices, head outputs
    (the output projection's input) for data-driven head matching, and up to ``neurons`` token rows of
    MLP activations (the down projection's input) for data-driven neuron matching (0: none)."""
    pairs = [(j, i) for j, i in enumerate(layer_map) if i is not None]
    t_stats: dict[int, TransferStats] = {}
    h_stats: dict[int, HeadOutputStats] = {}
    head_pairs = [(j, old_spec.module_name(i, "o"), new_spec.module_name(j, "o")) for j, i in pairs] if heads else []
    o_old, o_new = [o for _, o, _ in head_pairs], [o for _, _, o in head_pairs]
    shape = (old_spec.n_heads, old_spec.head_dim, new_spec.n_heads, new_spec.head_dim)
    mlp_pairs = [(j, old_spec.module_name(i, "down"), new_spec.module_name(j, "down")) for j, i in pairs] if neurons else []
    n_stats: dict[int, NeuronSample] = {}
    dev = input_device(new)  # where every accumulator works
    with captured_inputs(old, o_old + [o for _, o, _ in mlp_pairs], dev) as got_old, \
            captured_inputs(new, o_new + [o for _, _, o in mlp_pairs], dev) as got_new:
        for n, (enc_old, enc_new) in enumerate(batches):
            x_all, y_all = residual_streams(old, enc_old, dev)[:-1], residual_streams(new, enc_new, dev)[:-1]
            m_old, m_new = enc_old["attention_mask"], enc_new["attention_mask"]
            if transfers:
                x = activation_rows(x_all, m_old, pooled, row_norm)
                y = activation_rows(y_all, m_new, pooled, row_norm)
                for j, i in pairs:
                    if j not in t_stats:
                        t_stats[j] = TransferStats(x.shape[-1], y.shape[-1], y.device)
                    t_stats[j].update(x[i], y[j])
            for j, name_old, name_new in head_pairs:
                yo = activation_rows(got_old[name_old][None], m_old, pooled, row_norm=False)[0]
                yn = activation_rows(got_new[name_new][None], m_new, pooled, row_norm=False)[0]
                if j not in h_stats:
                    h_stats[j] = HeadOutputStats(*shape, device=yn.device)
                h_stats[j].update(yo, yn)
            for j, name_old, name_new in mlp_pairs:
                zo = activation_rows(got_old[name_old][None], m_old, pooled, row_norm=False)[0]
                zn = activation_rows(got_new[name_new][None], m_new, pooled, row_norm=False)[0]
                n_stats.setdefault(j, NeuronSample(neurons)).update(zo, zn)
            progress("activation pass", n + 1, len(batches))
    return SecondPass(transfers={j: st.fit(method, ridge) for j, st in t_stats.items()}, heads=h_stats,
                      neurons=n_stats)


def match_layers(old: nn.Module, new: nn.Module, old_spec: ModelSpec, new_spec: ModelSpec,
                 layer_map: list[int | None], transfer: torch.Tensor, head_matcher: str, mlp_matcher: str,
                 measured: SecondPass | None = None, head_sketch: int | None = None,
                 seed: int = 0, progress: ProgressFn = no_progress) -> dict[int, LayerAlignment]:
    """Head and neuron maps for every mapped (new layer ← old layer) pair, compared through the
    pair's own transfer matrix when the activation pass fitted one, else through the global one;
    heads by their measured outputs when the activation pass recorded them, else by weights."""
    measured = measured or SecondPass()
    layer_transfers = measured.transfers
    mapped = [(j, i) for j, i in enumerate(layer_map) if i is not None]
    mlp_name = resolve_mlp_matcher(mlp_matcher, old_spec.intermediate, new_spec.intermediate)
    result: dict[int, LayerAlignment] = {}
    for n, (j, i) in enumerate(mapped):
        w_old = layer_weights(old, old_spec, i)
        w_new = layer_weights(new, new_spec, j).to(w_old.q.device)
        t_layer = layer_transfers[j][0] if j in layer_transfers else None
        t = transfer if t_layer is None else t_layer
        head_stats = measured.heads.get(j)
        hsim = head_stats.similarity() if head_stats else head_similarity(w_old, w_new, t, sketch=head_sketch, seed=seed)
        hmap = HEAD_MATCHERS[head_matcher](hsim)
        nsim = measured.neurons[j].correlation() if j in measured.neurons else neuron_similarity(w_old, w_new, t)
        nmap = MLP_MATCHERS[mlp_name](nsim)
        score = torch.where(nmap >= 0, nsim.gather(1, nmap.clamp_min(0)[:, None])[:, 0], torch.zeros(()))
        maps = head_space_maps(w_old, w_new, t, hmap, old_spec, new_spec)
        if head_stats:  # value spaces mapped by what the heads output on the same text
            maps["v"] = head_stats.value_maps(hmap)
        result[j] = LayerAlignment(old_layer=i, head_sim=hsim, head_map=hmap, mlp_map=nmap, mlp_score=score,
                                   q_map=maps["q"], k_map=maps["k"], v_map=maps["v"], transfer=t_layer)
        progress("heads and neurons", n + 1, len(mapped))
    return result


def align_models(old: nn.Module, new: nn.Module, old_tok, new_tok, texts: list[str], cfg: AlignConfig,
                 progress: ProgressFn = no_progress) -> Alignment:
    """Compute the full alignment of two loaded base models."""
    torch.manual_seed(cfg.seed)
    clock = _Clock()
    old_spec, new_spec = model_spec(old), model_spec(new)
    old_vocab, new_vocab = old_tok.get_vocab(), new_tok.get_vocab()
    batches = list(calibration_batches(texts, old_tok, new_tok, cfg.seq_len, cfg.max_tokens, cfg.batch_size))
    # Token rows line up only when both tokenizers cut the calibration text identically.
    same_tokenizer = all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in batches)
    cka, estimator, rows = layer_similarity(
        old, new, batches, old_spec=old_spec, new_spec=new_spec, pooled=not same_tokenizer,
        row_norm=cfg.row_norm, estimator=cfg.cka, chunk=cfg.cka_chunk, max_bytes=cfg.cka_max_mb << 20,
        total=len(batches), progress=progress,
    )
    clock.lap("cka_s")
    layer_map = LAYER_MAPPERS[cfg.layer_map](cka)
    transfer, transfer_info = fit_transfer(old, new, old_vocab, new_vocab, cfg.transfer, cfg.ridge)
    clock.lap("embedding_transfer_s")
    heads_measured = cfg.head_similarity == "activations"
    neuron_rows = cfg.mlp_tokens if cfg.mlp_similarity == "activations" else 0
    measured = activation_pass(
        old, new, batches, old_spec=old_spec, new_spec=new_spec, layer_map=layer_map, pooled=not same_tokenizer,
        row_norm=cfg.row_norm, transfers=cfg.per_layer_transfer, heads=heads_measured, neurons=neuron_rows,
        method=cfg.transfer, ridge=cfg.ridge, progress=progress,
    ) if cfg.per_layer_transfer or heads_measured or neuron_rows else SecondPass()
    clock.lap("activation_pass_s")
    layers = match_layers(old, new, old_spec, new_spec, layer_map, transfer, cfg.head_match, cfg.mlp_match,
                          measured, cfg.head_sketch, cfg.seed, progress)
    clock.lap("head_and_neuron_matching_s")
    mapped = [j for j, i in enumerate(layer_map) if i is not None]
    info = {
        "options": cfg.model_dump(),
        "calibration": {"batches": len(batches), "rows": rows,
                        "rows_are": "tokens" if same_tokenizer else "sequences (mean-pooled)",
                        "same_tokenizer": same_tokenizer, "cka_estimator": estimator,
                        "outliers": "row_norm" if cfg.row_norm else "centre only"},
        **transfer_info,
        "timings": clock.laps,
        "scores": {
            "layer_path_cka": [round(float(cka[layer_map[j], j]), 4) for j in mapped],
            "head_similarity": {str(j): round(_matched_mean(la.head_sim, la.head_map), 4)
                                for j, la in layers.items()},
            "mlp_similarity": {str(j): round(float(la.mlp_score[la.mlp_map >= 0].mean()), 4)
                               if bool((la.mlp_map >= 0).any()) else None for j, la in layers.items()},
            "mlp_matched_fraction": {str(j): round(float((la.mlp_map >= 0).float().mean()), 4)
                                     for j, la in layers.items()},
            "layer_transfer_fit_cosine": {str(j): round(c, 4) for j, (_, c) in measured.transfers.items()},
        },
    }
    old_profile, new_profile = (ModelProfile(*model_profile(m, sp)) for m, sp in ((old, old_spec), (new, new_spec)))
    return Alignment(old=old_spec, new=new_spec, cka=cka, layer_map=layer_map, transfer=transfer,
                     layers=layers, old_profile=old_profile, new_profile=new_profile, info=info)


def _matched_mean(sim: torch.Tensor, mapping: list[int | None]) -> float:
    vals = [float(sim[j, i]) for j, i in enumerate(mapping) if i is not None]
    return sum(vals) / len(vals) if vals else 0.0


class _Clock:
    """Wall time per phase, reported in alignment.json."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now
