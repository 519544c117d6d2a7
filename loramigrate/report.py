"""Plots written next to stage outputs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch


def plot_cka(cka: torch.Tensor, layer_map: list[int | None], path: Path) -> None:
    """Heatmap of old×new CKA with the chosen layer map drawn over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(cka.float().numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
    pairs = [(j, i) for j, i in enumerate(layer_map) if i is not None]
    if pairs:
        ax.plot([j for j, _ in pairs], [i for _, i in pairs], "o-", color="red", ms=4, lw=1.5,
                label="layer map")
        ax.legend(loc="upper left")
    ax.set_xlabel("new layer")
    ax.set_ylabel("old layer")
    ax.set_title("linear CKA, old × new")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
