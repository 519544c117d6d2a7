"""Recipe YAML → typed stage configs (one source of truth for `run` and the stage commands)."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from pydantic import ValidationError, field_validator

from loramigrate.config import AlignConfig, _Config
from loramigrate.errors import ConfigError


class Recipe(_Config):
    """A migration of one base pair. Stages after align join as they land."""

    name: str
    description: str = ""
    align: AlignConfig

    @field_validator("align", mode="before")
    @classmethod
    def _expand_paths(cls, value: object) -> object:
        """``~`` and ``$VARS`` in model and calibration paths, so recipes travel between machines."""
        if isinstance(value, dict):
            return {k: os.path.expanduser(os.path.expandvars(v)) if k in ("old", "new", "calib") and isinstance(v, str)
                    else v for k, v in value.items()}
        return value


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe; unknown keys and bad values are errors naming the field.

    Raises:
        ConfigError: unreadable YAML or invalid content.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read recipe {path}: {' '.join(str(e).split())}") from None
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"recipe {path}: {problems}") from None
