"""The plots a person reads: what each one shows, checked on the figure as drawn (the PNGs were looked at).

    pytest tests/test_plots.py
"""

import pytest
import torch
from matplotlib.figure import Figure

from loramigrate import report


@pytest.fixture()
def drawn(monkeypatch):
    """The figures the plot functions save, kept for inspection."""
    figures = []
    real = Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def test_the_curve_has_a_baseline_a_title_and_each_legend_entry_once(drawn, tmp_path):
    init = {"step": 0, "s": 0.0, "val_loss": 1.2, "val_accuracy": 0.4}
    steps = [{"step": k, "s": 2.0 * k, "loss": 1.3 - 0.01 * k} for k in range(1, 11)]
    steps[4] |= {"val_loss": 1.0, "val_accuracy": 0.6}
    steps[9] |= {"val_loss": 0.9, "val_accuracy": 0.7}
    report.plot_curve([init, *steps], tmp_path / "curve.png")
    fig = drawn[0]
    labels = [t.get_text() for legend in fig.legends for t in legend.get_texts()]
    assert labels == ["training loss", "validation loss", "validation accuracy"]
    assert fig.get_suptitle() and not any(ax.get_legend() for ax in fig.axes)  # no legend over the data
    val = next(line for line in fig.axes[0].get_lines() if line.get_label() == "validation loss")
    assert list(val.get_xdata()) == [0, 5, 10] and list(val.get_ydata()) == [1.2, 1.0, 0.9]


def test_the_cka_map_has_layer_ticks_and_marks_new_layers_without_a_source(drawn, tmp_path):
    report.plot_cka(torch.rand(3, 6), [0, 1, 2, None, None, None], tmp_path / "cka.png")
    ax = drawn[0].axes[0]
    assert all(float(t).is_integer() for t in [*ax.get_xticks(), *ax.get_yticks()])
    hatched = [p for p in ax.patches if p.get_hatch()]
    assert sorted(p.get_x() + 0.5 for p in hatched) == [3, 4, 5]
    assert "new layer without a source" in [t.get_text() for legend in drawn[0].legends for t in legend.get_texts()]
