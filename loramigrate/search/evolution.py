"""The base evolution W_new − W_old of each adapted module, in new coordinates, as a rank-k view.

W_old is brought into new coordinates with the same maps transfer applies to an update (a dense W
maps as the factor pair (W, I)). Computed once per base pair and rank and cached inside the align
directory (``cache/`` is not part of its content hash), never per trial.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loramigrate.alignment import Alignment
from loramigrate.arch import weight_of
from loramigrate.lora import map_factors
from loramigrate.progress import ProgressFn, no_progress

log = logging.getLogger(__name__)
CACHE_DIR = "cache"


def module_evolution(old_w: torch.Tensor, new_w: torch.Tensor, alignment: Alignment, layer: int, role: str, rank: int,
                     seed: int = 0, device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-``rank`` factors (B, A) of W_new − map(W_old), by a randomized SVD (Halko et al.), computed in float32 on
    ``device`` (default: the old weight's), where they are returned: the dense maps and the SVD are the heavy part."""
    device = device or old_w.device
    old_w = old_w.detach().to(device, torch.float32)
    b, a = map_factors(alignment, layer, role, old_w, torch.eye(old_w.shape[1], device=device))
    diff = new_w.detach().to(device, torch.float32) - b @ a
    k = min(rank, *diff.shape)
    u, s, v = low_rank_svd(diff, q=min(k + 8, *diff.shape), seed=seed)
    return u[:, :k] * s[:k], v[:k].contiguous()


def low_rank_svd(x: torch.Tensor, q: int, seed: int, power_iters: int = 2
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Randomized SVD (Halko et al. 2011, alg. 4.4) of x (m, n): U (m, q), S (q,), Vh (q, n). It draws
    its test matrix from its own generator (``torch.svd_lowrank`` draws from the global RNG, which would
    change every later random draw of the caller)."""
    g = torch.Generator().manual_seed(seed)  # drawn on the host: the same test matrix on every device
    basis = torch.linalg.qr(x @ torch.randn(x.shape[1], q, generator=g).to(x.device)).Q
    for _ in range(power_iters):  # re-orthonormalised power iterations sharpen a slowly decaying spectrum
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.T @ basis).Q).Q
    u, s, vh = torch.linalg.svd(basis.T @ x, full_matrices=False)
    return basis @ u, s, vh


def cache_path(align_dir: Path, rank: int) -> Path:
    return Path(align_dir) / CACHE_DIR / f"evolution-r{rank}.safetensors"


Factors = tuple[torch.Tensor, torch.Tensor]


def base_evolution(align_dir: Path, alignment: Alignment, wanted: list[tuple[int, str]], rank: int,
                   load_models, progress: ProgressFn = no_progress, device: torch.device | str = "cpu"
                   ) -> dict[tuple[int, str], Factors]:
    """Evolution factors for each (new layer, role) in ``wanted`` that has a source layer.

    Cached modules are read from the align directory; missing ones are computed with the two bases
    from ``load_models()`` → (old, new) and the cache is rewritten atomically.
    """
    path = cache_path(align_dir, rank)
    cached = load_file(str(path)) if path.is_file() else {}
    out = {}
    todo = [(j, role) for j, role in wanted if j in alignment.layers]
    missing = [(j, role) for j, role in todo if f"{j}.{role}.b" not in cached]
    if missing:
        log.info("computing the base evolution of %d modules (rank %d, cached in %s)", len(missing), rank, path.parent)
        old, new = load_models()
        for n, (j, role) in enumerate(missing, 1):
            old_w = _weight(old, alignment.old.module_name(alignment.layers[j].old_layer, role))
            new_w = _weight(new, alignment.new.module_name(j, role))
            b, a = module_evolution(old_w, new_w, alignment, j, role, rank, device=device)
            cached[f"{j}.{role}.b"], cached[f"{j}.{role}.a"] = b.cpu(), a.cpu()
            progress("base evolution", n, len(missing))
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")  # workers sharing the alignment each write their own
        save_file({k: v.contiguous() for k, v in cached.items()}, str(tmp))
        tmp.replace(path)
    for j, role in todo:
        out[(j, role)] = (cached[f"{j}.{role}.b"], cached[f"{j}.{role}.a"])
    return out


def _weight(model: nn.Module, name: str) -> torch.Tensor:
    return weight_of(model.get_submodule(name))
