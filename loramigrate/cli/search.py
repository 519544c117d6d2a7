"""`loramigrate search`: choose the starting adapter by Bayesian optimisation over blends."""

from pathlib import Path
from typing import Annotated

import typer

from loramigrate.cli._options import DeviceOpt, DtypeOpt, ForceOpt, OutDirOpt, SeedOpt
from loramigrate.cli._ui import handle_errors, progress_bars
from loramigrate.config import SearchConfig


def _default(name: str):
    """The config's default, so that the option cannot drift from it."""
    return SearchConfig.model_fields[name].default

EXAMPLES = """
Examples:

  loramigrate search --align runs/pair/align --transfer runs/pair/sql/transfer --data val.jsonl \\
      --n-trials 30 -o runs/pair/sql/search

  # no labels: score blends by the KL to the old pair (old base + the adapter being migrated)
  loramigrate search ... --objective distill --teacher-adapter adapters/sql -o runs/pair/sql/search

  # two workers sharing one study (run each line in its own shell or on its own machine)
  loramigrate search ... --storage runs/pair/sql/study.log --study sql -o runs/pair/sql/search-w1
  loramigrate search ... --storage runs/pair/sql/study.log --study sql -o runs/pair/sql/search-w2
"""


@handle_errors
def search(
    align: Annotated[Path, typer.Option(help="Align stage directory.")],
    transfer: Annotated[Path, typer.Option(help="Transfer stage directory made with this alignment.")],
    data: Annotated[Path, typer.Option(help="Validation JSONL the trials are scored on.")],
    out: OutDirOpt,
    n_trials: Annotated[int, typer.Option(help="Finished (completed or pruned) trials in total, across workers "
                                          "and reruns.")] = 30,
    timeout: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    limit: Annotated[int, typer.Option(help="Validation examples scored per trial (the first N).")] = 64,
    space: Annotated[str, typer.Option(help="groups: α, β, γ per attention/MLP × early/middle/late; "
                                       "global: one α and one β.")] = "groups",
    sampler: Annotated[str, typer.Option(help="gp (Gaussian process + EI), tpe (larger spaces; learns from pruned "
                                         "trials too) or auto (gp; tpe with --fidelity-steps).")] = "auto",
    storage: Annotated[str | None, typer.Option(help="Optuna storage URL (sqlite:///…, postgresql://…, mysql://…) or "
                                                "a journal file (*.log); default: study.db in the output.")] = None,
    study: Annotated[str, typer.Option(help="Study name inside the storage.")] = "loramigrate-search",
    alpha_min: Annotated[float, typer.Option(help="α ∈ [min, max] scales the transferred delta.")] = _default("alpha_min"),
    alpha_max: Annotated[float, typer.Option(help="Upper end of α.")] = _default("alpha_max"),
    beta_max: Annotated[float | None, typer.Option(help="β ∈ [−max, max] scales the base evolution W_new − W_old; "
                                                 "default: 1 for same-shape bases whose layers and heads align one to "
                                                 "one (the weights only drifted), else 0 (β off).")] = None,
    gamma_max: Annotated[float, typer.Option(help="γ ∈ [0, max] scales a seeded fresh direction.")] = 0.5,
    evolution_rank: Annotated[int, typer.Option(help="Rank of the cached base-evolution view.")] = 16,
    objective: Annotated[str, typer.Option(help="loss: validation loss on the labels; distill: KL(old pair ‖ new "
                                           "base + blend) on the validation inputs (labels not needed).")] = "loss",
    teacher_adapter: Annotated[Path | None, typer.Option(help="The old adapter (--objective distill); its base is "
                                                         "the alignment's old model.")] = None,
    fidelity_steps: Annotated[int, typer.Option(help="Multi-fidelity objective: score a blend by its val loss after "
                                                "this many finetune steps on --train; poor trials are pruned "
                                                "(0: forward passes only).")] = 0,
    train: Annotated[Path | None, typer.Option(help="Training JSONL of the multi-fidelity steps.")] = None,
    fidelity_lr: Annotated[float, typer.Option(help="Learning rate of the multi-fidelity steps.")] = 1e-3,
    batch_size: Annotated[int, typer.Option(help="Examples per forward pass.")] = 16,
    dtype: DtypeOpt = "auto",
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    force: ForceOpt = False,
) -> None:
    """Search the initial adapter: the transfer-as-is point is trial 0, so search only improves on it."""
    from loramigrate.config import ModelLoadConfig
    from loramigrate.search import run_search

    cfg = SearchConfig(
        align=str(align), transfer=str(transfer), data=str(data), n_trials=n_trials, timeout=timeout, limit=limit,
        space=space, sampler=sampler, storage=storage, study=study, alpha_min=alpha_min, alpha_max=alpha_max,
        beta_max=beta_max, gamma_max=gamma_max, evolution_rank=evolution_rank, objective=objective,
        teacher_adapter=str(teacher_adapter) if teacher_adapter else None, fidelity_steps=fidelity_steps,
        train=str(train) if train else None, fidelity_lr=fidelity_lr, batch_size=batch_size, seed=seed,
        load=ModelLoadConfig(dtype=dtype, device=device),
    )
    with progress_bars() as progress:
        result = run_search(cfg, out, progress=progress, force=force)
    typer.echo(str(result))
