"""Data-driven correspondences of a mapped layer pair, from what the two blocks compute on the same
calibration tokens.

Weight-only similarities are at noise level between separately trained models (docs/testbed.md).
Heads: linear CKA of the two heads' outputs (the output projection's input) gives the similarity,
and their centred cross-covariance an orthogonal map between the heads' value spaces.
MLP neurons: correlation of the intermediate activations (the down projection's input) over a capped
sample of tokens (a full I_new × I_old cross-covariance per layer pair would cost GBs).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


class HeadOutputStats:
    """Streaming sums and cross-covariance (float64) of per-head outputs of one mapped layer pair."""

    def __init__(self, h_old: int, hd_old: int, h_new: int, hd_new: int, device: torch.device | str = "cpu") -> None:
        self.shape = (h_old, hd_old, h_new, hd_new)
        f64 = {"dtype": torch.float64, "device": device}  # on the activations' device
        self.n = 0
        self.sum_old = torch.zeros(h_old * hd_old, **f64)
        self.sum_new = torch.zeros(h_new * hd_new, **f64)
        self.cross = torch.zeros(h_new * hd_new, h_old * hd_old, **f64)
        self.self_old = torch.zeros(h_old, hd_old, hd_old, **f64)
        self.self_new = torch.zeros(h_new, hd_new, hd_new, **f64)

    def update(self, y_old: torch.Tensor, y_new: torch.Tensor) -> None:
        """Rows of head outputs: y_old (n, H_old·hd_old), y_new (n, H_new·hd_new)."""
        h_old, hd_old, h_new, hd_new = self.shape
        yo, yn = y_old.double(), y_new.double()
        self.n += yo.shape[0]
        self.sum_old += yo.sum(0)
        self.sum_new += yn.sum(0)
        self.cross += yn.T @ yo
        ho, hn = yo.view(-1, h_old, hd_old), yn.view(-1, h_new, hd_new)
        self.self_old += torch.einsum("nha,nhb->hab", ho, ho)
        self.self_new += torch.einsum("nha,nhb->hab", hn, hn)

    def _centred(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h_old, hd_old, h_new, hd_new = self.shape
        mo, mn = self.sum_old / self.n, self.sum_new / self.n
        cross = (self.cross - self.n * torch.outer(mn, mo)).view(h_new, hd_new, h_old, hd_old).permute(0, 2, 1, 3)
        mo_h, mn_h = mo.view(h_old, hd_old), mn.view(h_new, hd_new)
        c_old = self.self_old - self.n * torch.einsum("ha,hb->hab", mo_h, mo_h)
        c_new = self.self_new - self.n * torch.einsum("ha,hb->hab", mn_h, mn_h)
        return cross, c_old, c_new

    def similarity(self) -> torch.Tensor:
        """(H_new, H_old) linear CKA between every pair of head outputs (on the CPU, for the matchers)."""
        cross, c_old, c_new = self._centred()
        num = cross.pow(2).sum((2, 3))
        den = c_new.pow(2).sum((1, 2)).sqrt()[:, None] * c_old.pow(2).sum((1, 2)).sqrt()[None, :]
        return (num / den.clamp_min(1e-30)).float().cpu()

    def value_maps(self, head_map: list[int | None]) -> torch.Tensor:
        """(H_new, hd_new, hd_old): per new head, the orthogonal map from its source head's output
        coordinates to its own, fitted on the data (zeros without a source)."""
        cross, _, _ = self._centred()
        h_old, hd_old, h_new, hd_new = self.shape
        maps = torch.zeros(h_new, hd_new, hd_old)
        for h, src in enumerate(head_map):
            if src is not None:
                u, _, vh = torch.linalg.svd(cross[h, src], full_matrices=False)
                maps[h] = (u @ vh).float().cpu()
        return maps


class NeuronSample:
    """The first ``cap`` token rows of intermediate activations of a mapped layer pair, in bfloat16: half
    of float32's memory with its range, where float16 overflows (65504) on massive activations."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.old: list[torch.Tensor] = []
        self.new: list[torch.Tensor] = []
        self.rows = 0

    def update(self, z_old: torch.Tensor, z_new: torch.Tensor) -> None:
        take = min(self.cap - self.rows, z_old.shape[0])
        if take > 0:
            self.old.append(z_old[:take].bfloat16())
            self.new.append(z_new[:take].bfloat16())
            self.rows += take

    def correlation(self) -> torch.Tensor:
        """(I_new, I_old) Pearson correlation of every neuron pair over the sampled tokens (computed where they
        were sampled, returned on the CPU)."""
        def standardise(parts: list[torch.Tensor]) -> torch.Tensor:
            z = torch.cat(parts).float()
            z = z - z.mean(0)
            return z / z.norm(dim=0).clamp_min(1e-12)
        return (standardise(self.new).T @ standardise(self.old)).cpu()


@contextlib.contextmanager
def captured_inputs(model: nn.Module, names: list[str], device: torch.device | None = None
                    ) -> Iterator[dict[str, torch.Tensor]]:
    """While active, ``store[name]`` holds the latest input of each named module in the model's dtype, on
    ``device`` (default: where the module computed it; a copy to the host per hook would stall a GPU)."""
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        def hook(_module, args, name=name):
            store[name] = args[0].detach().to(device or args[0].device)
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()

