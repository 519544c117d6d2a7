"""`run`'s inputs, checked before its first stage: a missing adapter or data file must not surface only after
align (minutes on a real pair) has run."""

from __future__ import annotations

from pathlib import Path

from loramigrate.adapters import check_adapter_dir
from loramigrate.errors import ArtifactError
from loramigrate.evaluate import read_task
from loramigrate.models import resolve_model
from loramigrate.recipes import Recipe


def check_inputs(recipe: Recipe) -> None:
    """Both bases, every adapter, the three data splits and the files the stage sections name.

    Raises:
        ArtifactError: the first input that is missing or unreadable; for an adapter, with the recipe's
            ``make_adapter`` command that trains it.
    """
    resolve_model(recipe.old)
    resolve_model(recipe.new)
    for adapter in recipe.adapters:
        try:
            check_adapter_dir(adapter)
        except ArtifactError as e:
            if not recipe.make_adapter:
                raise
            raise ArtifactError(f"{e}; the recipe trains it with: {recipe.make_adapter}") from None
    read_task(recipe.data.train, 1, unlabelled=True)  # a teacher may label the training rows
    read_task(recipe.data.val, 1)
    read_task(recipe.data.test, 1)
    calib = recipe.align_config().calib
    if calib and not Path(calib).is_file():
        raise ArtifactError(f"align.calib: {calib} not found")
    prompts = recipe.transfer_config("ALIGN", "ADAPTER").prompts
    if prompts:
        read_task(prompts, 1, unlabelled=True)
