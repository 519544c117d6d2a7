"""Options shared by every command, and the options generated from the stage configs.

A config field's default, type, choices (its ``Literal``) and help (its ``description``) are written once, in
``config.py``; ``with_config`` turns them into typer options, as mergekit's ``add_merge_options`` does from its
pydantic model, so a command cannot drift from its config.
"""

import functools
import inspect
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar, Union, get_args, get_origin

import typer
from pydantic import BaseModel, ValidationError

from loramigrate.config import explain, is_config
from loramigrate.errors import ConfigError
from loramigrate.recipes import apply_overrides

F = TypeVar("F", bound=Callable[..., Any])


def flag(*names: str, **kwargs: Any) -> Any:
    """A boolean option; it takes no value, so its help shows none (typer's rich help would draw ``<bool>``)."""
    return typer.Option(*names, metavar="", **kwargs)


OutDirOpt = Annotated[Path, typer.Option("--out", "-o", help="Output stage directory (written atomically).")]
ForceOpt = Annotated[bool, flag("--force", help="Redo the stage even if its output is up to date.")]
SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override an option: KEY=VALUE (VALUE as YAML, KEY as in a recipe section, e.g. load.dtype); "
    "applied after the options above.")]
RecipeSetOpt = Annotated[list[str] | None, typer.Option(
    "--set", help="Override a recipe value: STAGE.KEY=VALUE or KEY=VALUE at the top (VALUE as YAML).")]


def _cli_type(annotation: Any) -> Any:
    """What typer parses a field as; a list or a union of kinds (``rank``: int or 'auto') is taken as text,
    which the config's own validation then parses."""
    if get_origin(annotation) in (Union, types.UnionType):
        kinds = [a for a in get_args(annotation) if a is not type(None)]
        return (_cli_type(kinds[0]) if len(kinds) == 1 else str) | None
    return str if get_origin(annotation) is list else annotation


def config_options(config: type[BaseModel], given_only: bool = False) -> list[inspect.Parameter]:
    """One keyword-only typer option per field of ``config``, in a help panel named by the config's title; a
    nested config's fields join flat (``load`` → --dtype, --device in "Model loading"). ``given_only``: every
    option defaults to None (not given).
    """
    params = []
    panel = config.model_config.get("title")
    for name, field in config.model_fields.items():
        if is_config(field.annotation):
            params += config_options(field.annotation, given_only)
            continue
        kind = _cli_type(field.annotation) | None if given_only else _cli_type(field.annotation)
        default = None if given_only else inspect.Parameter.empty if field.is_required() else field.default
        option = (flag if field.annotation is bool else typer.Option)(help=field.description, rich_help_panel=panel)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[kind, option]))
    return params


def _regroup(config: type[BaseModel], values: dict[str, Any]) -> dict[str, Any]:
    """Flat option values → the config's nested layout."""
    return {name: _regroup(field.annotation, values) if is_config(field.annotation) else values[name]
            for name, field in config.model_fields.items()}


def with_config(config: type[BaseModel], given_only: bool = False, arg: str = "cfg") -> Callable[[F], F]:
    """Give a command every field of ``config`` as an option, plus --set, and call it with the validated
    config as ``arg``; the command declares only what is not a field (the output directory, --force).

    ``given_only``: no --set, and ``arg`` is the dict of the options given (``run`` applies them to a recipe).
    """
    def decorate(fn: F) -> F:
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != arg]
        fields = config_options(config, given_only)
        names = [p.name for p in fields]
        if clash := set(names) & {p.name for p in own}:
            raise TypeError(f"{fn.__name__} declares config fields as its own options: {sorted(clash)}")
        required = [p for p in fields if p.default is p.empty]
        extra = [] if given_only else [inspect.Parameter("set_", inspect.Parameter.KEYWORD_ONLY, default=None,
                                                         annotation=SetOpt)]
        params = [*required, *own, *(p for p in fields if p.default is not p.empty), *extra]

        @functools.wraps(fn)
        def command(**kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in names}
            if given_only:
                return fn(**{arg: {k: v for k, v in values.items() if v is not None}}, **kwargs)
            raw = apply_overrides(_regroup(config, values), kwargs.pop("set_") or [])
            try:
                cfg = config.model_validate(raw)
            except ValidationError as e:
                raise ConfigError(f"invalid configuration: {explain(e, config)}") from None
            return fn(**{arg: cfg}, **kwargs)

        command.__signature__ = inspect.Signature(params)  # what typer reads the options from
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command  # type: ignore[return-value]

    return decorate
