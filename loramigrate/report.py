"""Plots written next to stage outputs (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_cka(cka: torch.Tensor, layer_map: list[int | None], path: Path) -> None:
    """Heatmap of old × new CKA (values written in when the grid is small), the chosen layer map drawn over it,
    and the new layers without a source layer hatched."""
    from matplotlib.patches import Patch, Rectangle
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()
    values = cka.float().numpy()
    n_old, n_new = values.shape
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    im = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis", vmin=0, vmax=1)
    if n_old * n_new <= 144:
        for i in range(n_old):
            for j in range(n_new):
                ax.text(j, i - 0.3, f"{values[i, j]:.2f}", ha="center", va="center", fontsize=8,  # below the path
                        color="black" if values[i, j] > 0.6 else "white")
    handles = []
    pairs = [(j, i) for j, i in enumerate(layer_map) if i is not None]
    if pairs:
        handles += ax.plot([j for j, _ in pairs], [i for _, i in pairs], "o-", color="red", ms=5, lw=1.5,
                           label="layer map (old layer each new layer takes)")
    unmapped = [j for j, i in enumerate(layer_map) if i is None]
    for j in unmapped:
        ax.add_patch(Rectangle((j - 0.5, -0.5), 1, n_old, fill=False, hatch="//", edgecolor=(1, 1, 1, 0.5), lw=0))
    if unmapped:
        handles.append(Patch(facecolor="none", edgecolor="grey", hatch="//", label="new layer without a source"))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("new layer")
    ax.set_ylabel("old layer")
    ax.set_title("linear CKA between old and new layer outputs")
    fig.colorbar(im, ax=ax, label="CKA")
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if handles else 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curve(history: list[dict], path: Path) -> None:
    """Training loss, validation loss and the validation metric against steps and against seconds. Rows with
    ``val_*`` entries are evaluations; the first, at step 0, is the init's (the baseline)."""
    plt = _pyplot()
    evals = [r for r in history if "val_loss" in r]
    steps = [r for r in history if "loss" in r]
    metric = next((k for k in ("val_exact_match", "val_accuracy") if evals and k in evals[0]), None)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, x in zip(axes, ("step", "s"), strict=True):
        lines = ax.plot([r[x] for r in steps], [r["loss"] for r in steps], lw=1, alpha=0.6, color="C0",
                        label="training loss")
        lines += ax.plot([r[x] for r in evals], [r["val_loss"] for r in evals], "o-", color="C1",
                         label="validation loss")
        ax.set_xlabel("step" if x == "step" else "seconds")
        ax.set_ylabel("loss")
        ax.set_xlim(left=0)
        if metric:
            twin = ax.twinx()
            lines += twin.plot([r[x] for r in evals], [r[metric] for r in evals], "s--", color="green",
                               label=f"validation {metric[4:].replace('_', ' ')}")
            twin.set_ylabel(metric[4:].replace("_", " "))
            twin.set_ylim(0, 1)
    fig.suptitle("finetune: training and validation (the first validation point is the init, before training)")
    fig.legend(handles=lines, loc="lower center", ncol=len(lines), frameon=False)  # one entry per series
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)
