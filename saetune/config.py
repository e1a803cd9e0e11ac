"""Stage configs: dataclasses whose field help is the CLI's ``--help``.

Each stage has one dataclass. A field is declared with :func:`opt`, which stores its help text
once; :func:`add_arguments` turns the fields into flags, :func:`load_config` reads a YAML recipe,
applies flag overrides, and checks every key and type, naming the bad one.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Union

import yaml

from .errors import SaetuneError
from .io import read_text_utf8

_MISSING = dataclasses.MISSING


def opt(default: Any = _MISSING, help: str = "", *, factory: Any = _MISSING) -> Any:
    """A documented config field. ``help`` is the one place the field is described."""
    if factory is not _MISSING:
        return dataclasses.field(default_factory=factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _unwrap_optional(tp)
    origin = typing.get_origin(base)
    if origin is Literal:
        name = " | ".join(repr(a) for a in typing.get_args(base))
    elif origin in (list, tuple):
        (arg, *_) = typing.get_args(base) or (Any,)
        name = f"list of {_type_name(arg)}"
    else:
        name = getattr(base, "__name__", str(base))
    return f"{name} or null" if optional else name


def _coerce_literal(value: Any, base: Any, key: str) -> Any:
    """Return the ``Literal`` choice equal to ``value`` (or to its string form), else name the choices."""
    choices = typing.get_args(base)
    for c in choices:
        if value == c or (isinstance(value, str) and str(c) == value):
            return c
    raise SaetuneError(f"config key '{key}' has value {value!r}; valid values: {', '.join(map(repr, choices))}")


def _coerce_list(value: Any, base: Any, key: str) -> list[Any]:
    """A list from a list/tuple, a comma- or space-separated string, or a single item; items coerced."""
    (arg, *_) = typing.get_args(base) or (Any,)
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split() if v]
    if not isinstance(value, (list, tuple)):
        value = [value]
    return [coerce(v, arg, key) for v in value]


def _to_bool(value: Any, bad: Callable[[], SaetuneError]) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
        return False
    raise bad()


def _to_int(value: Any, bad: Callable[[], SaetuneError]) -> int:
    """Integers, integral floats and integral numeric strings (``"1e3"``, ``"10_000"``); never bools."""
    if isinstance(value, bool):
        raise bad()
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value.replace("_", ""))
        except ValueError:
            raise bad() from None
        if f.is_integer():
            return int(f)
    raise bad()


def _to_float(value: Any, bad: Callable[[], SaetuneError]) -> float:
    if isinstance(value, bool):
        raise bad()
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise bad() from None
    raise bad()


def _to_str(value: Any, bad: Callable[[], SaetuneError]) -> str:
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise bad()


# Scalar converters, checked by identity against the (non-optional) field type.
_SCALAR_CONVERTERS: tuple[tuple[type, Callable[[Any, Callable[[], SaetuneError]], Any]], ...] = (
    (bool, _to_bool),
    (int, _to_int),
    (float, _to_float),
    (str, _to_str),
)


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert ``value`` (from YAML or a flag string) to ``tp`` or raise a SaetuneError naming ``key``."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise SaetuneError(f"config key '{key}' may not be null; expected {_type_name(tp)}")
    origin = typing.get_origin(base)
    if origin is Literal:
        return _coerce_literal(value, base, key)
    if origin in (list, tuple):
        return _coerce_list(value, base, key)

    def bad() -> SaetuneError:
        return SaetuneError(f"config key '{key}' has value {value!r}, expected {_type_name(tp)}")

    for scalar, convert in _SCALAR_CONVERTERS:
        if base is scalar:
            return convert(value, bad)
    if base is Any:
        return value
    raise bad()


def config_fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type, data: dict[str, Any], *, source: str = "config") -> Any:
    """Build ``cls`` from a dict, refusing unknown keys and ill-typed values."""
    if not isinstance(data, dict):
        raise SaetuneError(f"{source} must be a mapping of keys to values, got {type(data).__name__}")
    fields = config_fields(cls)
    unknown = [k for k in data if k.replace("-", "_") not in fields]
    if unknown:
        raise SaetuneError(
            f"unknown key {unknown[0]!r} in {source} for {cls.__name__}; valid keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for k, v in data.items():
        k = k.replace("-", "_")
        kwargs[k] = coerce(v, fields[k][1], k)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise SaetuneError(f"{source} for {cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise SaetuneError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(read_text_utf8(path, "config file")) or {}
    except yaml.YAMLError as e:
        raise SaetuneError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise SaetuneError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return data


def load_config(cls: type, path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Any:
    """YAML file (a recipe name from ``saetune/recipes`` or a path), then overrides, then checks."""
    data: dict[str, Any] = {}
    source = "config"
    if path is not None:
        p = resolve_recipe(path)
        data.update(read_yaml(p))
        source = f"config file {str(p)!r}"
    data.update(overrides or {})
    return from_dict(cls, data, source=source)


def resolve_recipe(path: str | Path) -> Path:
    p = Path(path)
    if p.exists():
        return p
    recipes = Path(__file__).parent / "recipes"
    for cand in (recipes / f"{path}.yaml", recipes / str(path)):
        if cand.exists():
            return cand
    names = sorted(q.stem for q in recipes.glob("*.yaml"))
    raise SaetuneError(f"config {str(path)!r} is neither a file nor a shipped recipe; recipes: {', '.join(names)}")


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field (``--field-name``); only flags the user gives override the config."""
    group = parser.add_argument_group(f"{cls.__name__} fields (also settable in a YAML --config)")
    for name, (f, tp) in config_fields(cls).items():
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        flag = "--" + name.replace("_", "-")
        base, _ = _unwrap_optional(tp)
        # argparse %-formats help (for %(default)s): a literal % in a field's text must reach it doubled
        h = f"{help_text} [{_type_name(tp)}; default: {default!r}]".replace("%", "%%")
        if base is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=h)
        elif typing.get_origin(base) in (list, tuple):
            group.add_argument(flag, dest=name, nargs="+", default=argparse.SUPPRESS, metavar="V", help=h)
        else:
            group.add_argument(flag, dest=name, default=argparse.SUPPRESS, metavar="V", help=h)


def overrides_from_args(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    return {k: getattr(args, k) for k in config_fields(cls) if hasattr(args, k)}


def diff_configs(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Keys whose values differ between two config dicts (for refusing a changed resume)."""
    keys = sorted(set(a) | set(b))
    return [k for k in keys if k not in ignore and a.get(k) != b.get(k)]
