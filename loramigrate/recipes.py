"""Recipe YAML → the typed stage configs the stage commands use (one source of truth for `run`).

A recipe names the base pair, the old adapter(s), the task data and each stage's options; the paths
that link stages (align dir, transfer dir, …) are filled in by `run`, so a stage section holds only
options. Unknown keys anywhere are errors naming the field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from loramigrate.config import (
    AlignConfig,
    EvalConfig,
    FinetuneConfig,
    FleetConfig,
    ModelLoadConfig,
    SearchConfig,
    TransferConfig,
    _Config,
    explain,
    unknown_key,
)
from loramigrate.errors import ConfigError

CONFIGS = {"align": AlignConfig, "transfer": TransferConfig, "search": SearchConfig, "finetune": FinetuneConfig,
           "eval": EvalConfig}
STAGES = tuple(CONFIGS)
# the fields `run` fills from the recipe's models and data and from the stage before: no section sets them
LINKS = {"align": ("old", "new"), "transfer": ("align", "adapter"), "search": ("align", "transfer", "data"),
         "finetune": ("base", "init", "data", "val"), "eval": ()}


def cache_dir() -> Path:
    """Where the testbed's models, data and the demo's adapters live ($LORAMIGRATE_CACHE)."""
    return Path(os.environ.get("LORAMIGRATE_CACHE", Path.home() / ".cache" / "loramigrate"))


_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _expand(value: Any) -> Any:
    """``~`` and ``$VARS`` in strings, so recipes travel between machines; ``$LORAMIGRATE_CACHE``
    defaults to ~/.cache/loramigrate, any other unset variable is an error."""
    if not isinstance(value, str):
        return value

    def var(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name == "LORAMIGRATE_CACHE":
            return str(cache_dir())
        if name not in os.environ:
            raise ValueError(f"{value!r} uses ${name}, which is not set")
        return os.environ[name]
    return os.path.expanduser(_VAR.sub(var, value))


class TaskData(_Config):
    train: str  # finetune data
    val: str  # search trials and finetune evaluations
    test: str  # the report's comparison

    _paths = field_validator("train", "val", "test", mode="before")(lambda cls, v: _expand(v))


class Recipe(_Config):
    """A migration of one or more adapters across one base pair."""

    name: str
    description: str = ""
    old: str
    new: str
    adapters: list[str] = Field(min_length=1)
    make_adapter: str = ""  # the command that trains the old adapter: `run` shows it when an adapter is missing
    data: TaskData
    load: ModelLoadConfig = ModelLoadConfig()  # every stage's; a section's own `load:` overrides it key by key
    align: dict[str, Any] = {}
    transfer: dict[str, Any] = {}
    search: dict[str, Any] | None = {}  # null: skip the stage (finetune starts from the transfer)
    finetune: dict[str, Any] | None = {}  # null: skip the stage (the final adapter is the search's or transfer's)
    eval: dict[str, Any] = {}
    fleet: FleetConfig = FleetConfig()  # `loramigrate fleet` only: engine, resources per task

    _paths = field_validator("old", "new", "make_adapter", mode="before")(lambda cls, v: _expand(v))

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapter_paths(cls, value: Any) -> Any:
        return [_expand(v) for v in value] if isinstance(value, list) else value

    @model_validator(mode="after")
    def _sections_are_valid(self) -> Recipe:
        """Build every stage config once with placeholder links, so a bad option fails at load time."""
        builds = {"align": self.align_config, "transfer": lambda: self.transfer_config("ALIGN", "ADAPTER"),
                  "search": lambda: self.search is None or self.search_config("ALIGN", "TRANSFER", "ADAPTER"),
                  "finetune": lambda: self.finetune is None or self.finetune_config("INIT", "ADAPTER"),
                  "eval": self.eval_config}
        for section, build in builds.items():
            known = [k for k in CONFIGS[section].model_fields if k not in LINKS[section]]
            for key in getattr(self, section) or {}:
                if key not in known:
                    raise ValueError(unknown_key(f"{section}.{key}", known))
            try:
                build()
            except ValidationError as e:
                raise ValueError(explain(e, CONFIGS[section], f"{section}.")) from None
        return self

    def _section(self, name: str) -> dict[str, Any]:
        """A stage's section with its paths expanded and the recipe's load under its own."""
        section = _with_paths(getattr(self, name) or {})
        own = section.get("load") or {}
        section["load"] = {**self.load.model_dump(), **own} if isinstance(own, dict) else own
        return section

    def align_config(self) -> AlignConfig:
        return AlignConfig(old=self.old, new=self.new, **self._section("align"))

    def transfer_config(self, align: str, adapter: str) -> TransferConfig:
        """``prompts: train`` (or ``val``, ``test``) takes the data-aware transfer's inputs from that split."""
        section = self._section("transfer")
        if section.get("prompts") in SPLITS:
            section["prompts"] = getattr(self.data, section["prompts"])
        return TransferConfig(align=align, adapter=adapter, **section)

    def search_config(self, align: str, transfer: str, source: str) -> SearchConfig:
        """``source`` is the old adapter being migrated: the ``distill`` objective's teacher (on the alignment's
        old base). The multi-fidelity objective (fidelity_steps > 0) trains on the recipe's data."""
        search = self._section("search")
        teacher = {"teacher_adapter": source} if search.get("objective") == "distill" else {}
        options = {"train": self.data.train if search.get("fidelity_steps") else None, **teacher, **search}
        return SearchConfig(align=align, transfer=transfer, data=self.data.val, **options)

    def finetune_config(self, init: str, source: str) -> FinetuneConfig:
        """``source`` is the old adapter being migrated: with ``teacher: old`` or ``proxy`` it teaches, on the
        recipe's old base (unless the section names another teacher)."""
        section = self._section("finetune")
        teacher = {"teacher_base": self.old, "teacher_adapter": source} if section.get("teacher", "none") != "none" else {}
        return FinetuneConfig(base=self.new, init=init, data=self.data.train, val=self.data.val,
                              **{**teacher, **section})

    def eval_config(self) -> EvalConfig:
        return EvalConfig(**self._section("eval"))


SPLITS = ("train", "val", "test")
_PATH_KEYS = ("calib", "prompts")  # section options that name files: ~ and $VARS expanded


def _with_paths(section: dict[str, Any]) -> dict[str, Any]:
    return {k: _expand(v) if k in _PATH_KEYS else v for k, v in section.items()}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``stage.key=value`` (value parsed as YAML) into the raw recipe; ``key=value`` at the top.

    Raises:
        ConfigError: an override without ``=``.
    """
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected STAGE.KEY=VALUE")
        *parents, leaf = key.strip().split(".")
        node = raw
        for p in parents:
            if node.get(p) is None:
                node[p] = {}
            node = node[p]
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {p} is not a section")
        try:
            node[leaf] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from None
    return raw


def load_recipe(path: str | Path, overrides: list[str] = (), adapters: list[str] | None = None,
                load: dict[str, str] | None = None) -> Recipe:
    """Read and validate a recipe, with ``--set`` overrides applied first, ``adapters`` (paths, taken as they
    are) replacing the recipe's, and ``load`` (``run --dtype/--device``) over every stage's load settings.

    Raises:
        ConfigError: unreadable YAML or invalid content, naming the field.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read recipe {path}: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of sections")
    raw = apply_overrides(raw, list(overrides))
    sections = ["", *(f"{s}." for s in STAGES if raw.get(s, {}) is not None)]  # null: a skipped stage stays skipped
    raw = apply_overrides(raw, [f"{s}load.{k}={v}" for s in sections for k, v in (load or {}).items()])
    if adapters is not None:
        raw["adapters"] = adapters
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"recipe {path}: {explain(e, Recipe)}") from None
