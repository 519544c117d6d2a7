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


def fit_lstsq(xtx: torch.Tensor, ytx: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """Ridge least squares T = argmin ‖x Tᵀ − y‖² + λ‖T‖², from xᵀx (d_old²) and yᵀx (d_new × d_old);
    λ is relative to the mean of diag(xᵀx)."""
    xtx = xtx.double()
    lam = ridge * xtx.diagonal().mean()
    eye = torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device)
    return torch.linalg.solve(xtx + lam * eye, ytx.double().T).T.float()


def fit_procrustes(xtx: torch.Tensor, ytx: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """(Semi-)orthogonal T = U Vᵀ from the SVD of yᵀx: rotates without rescaling any direction."""
    # uncentred on purpose: LoRA deltas act on whole hidden vectors, mean included, so T must map the mean too
    u, _, vh = torch.linalg.svd(ytx.double(), full_matrices=False)
    return (u @ vh).float()


TRANSFER_FITS: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {
    "procrustes": fit_procrustes,
    "lstsq": fit_lstsq,
}


def fit_cosine(t: torch.Tensor, xtx: torch.Tensor, ytx: torch.Tensor, yty_trace: torch.Tensor) -> float:
    """Cosine between T·x and y over all rows, ⟨xTᵀ, y⟩ / (‖xTᵀ‖ ‖y‖), from the same statistics.

    1 means a perfect fit up to one global scale (the models differ in activation norms).
    """
    t = t.double()
    inner = (t * ytx.double()).sum()
    pred_sq = ((t @ xtx.double()) * t).sum()
    return float(inner / (pred_sq * yty_trace).clamp_min(1e-30).sqrt())


class TransferStats:
    """Streaming xᵀx, yᵀx and ‖y‖² (float64, on the rows' ``device``) for one transfer-matrix fit."""

    def __init__(self, d_old: int, d_new: int, device: torch.device | str = "cpu") -> None:
        self.xtx = torch.zeros(d_old, d_old, dtype=torch.float64, device=device)
        self.ytx = torch.zeros(d_new, d_old, dtype=torch.float64, device=device)
        self.yty = torch.zeros((), dtype=torch.float64, device=device)  # a tensor: no host sync per batch

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x, y = x.double(), y.double()
        self.xtx += x.T @ x
        self.ytx += y.T @ x
        self.yty += y.pow(2).sum()

    def fit(self, method: str, ridge: float) -> tuple[torch.Tensor, float]:
        """T (on the CPU) and its fit cosine."""
        t = TRANSFER_FITS[method](self.xtx, self.ytx, ridge)
        return t.cpu(), fit_cosine(t, self.xtx, self.ytx, self.yty)
