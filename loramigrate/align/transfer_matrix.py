"""Hidden-space transfer matrix T (d_new × d_old), h_new ≈ T · h_old, fitted on the input
embeddings of the tokens both tokenizers share."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from loramigrate.errors import IncompatibleModelsError


def shared_tokens(old_vocab: Mapping[str, int], new_vocab: Mapping[str, int], n_old: int, n_new: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the token strings present in both vocabularies (and inside both embedding tables).

    Raises:
        IncompatibleModelsError: fewer than two shared tokens.
    """
    pairs = sorted((i, new_vocab[t]) for t, i in old_vocab.items()
                   if t in new_vocab and i < n_old and new_vocab[t] < n_new)
    if len(pairs) < 2:
        raise IncompatibleModelsError(
            f"the two tokenizers share {len(pairs)} tokens; a transfer matrix needs shared tokens "
            "(use models whose vocabularies overlap)"
        )
    ids = torch.tensor(pairs, dtype=torch.long)
    return ids[:, 0], ids[:, 1]


def fit_lstsq(x: torch.Tensor, y: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Ridge least squares T = argmin ‖x Tᵀ − y‖² + λ‖T‖², λ relative to the mean of diag(xᵀx)."""
    x, y = x.double(), y.double()
    gram = x.T @ x
    lam = ridge * gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, x.T @ y).T.float()


def fit_procrustes(x: torch.Tensor, y: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """(Semi-)orthogonal T = U Vᵀ from the SVD of yᵀx: rotates without rescaling any direction."""
    u, _, vh = torch.linalg.svd(y.double().T @ x.double(), full_matrices=False)
    return (u @ vh).float()


TRANSFER_FITS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "procrustes": fit_procrustes,
    "lstsq": fit_lstsq,
}


def fit_quality(x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> float:
    """R² of the fit after one optimal global scale (the models differ in embedding norm)."""
    pred = x.double() @ t.double().T
    y = y.double()
    scale = (pred * y).sum() / pred.pow(2).sum().clamp_min(1e-30)
    resid = (scale * pred - y).pow(2).sum()
    return float(1 - resid / (y - y.mean(0)).pow(2).sum().clamp_min(1e-30))
