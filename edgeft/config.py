"""Config is data: one dataclass per step, loadable from YAML/TOML, every key also a CLI flag.

Precedence: dataclass defaults < config file < flags. The resolved config is saved in the ledger entry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import types
import typing
from pathlib import Path

import click

from .errors import EdgeftError, first_line
from .inputs import check_unicode, parse_yaml, shown_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def read_config_file(path: str | Path, what: str = "--config") -> dict:
    """A YAML/TOML/JSON config file as a mapping of setting names to values (one-line errors for a missing,
    binary, unparsable or wrongly shaped file; values are checked later, against the config class)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise EdgeftError(f"{what} {path}: no such file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise EdgeftError(f"{what} {path}: not UTF-8 text (byte {e.start}); save it as UTF-8 YAML or TOML") from None
    except OSError as e:
        raise EdgeftError(f"{what} {path}: cannot read it ({e.strerror})") from None
    try:
        # YAML is a superset of JSON, so .json files parse here too.
        data = tomllib.loads(text) if path.suffix == ".toml" else (parse_yaml(text, f"{what} {path}") or {})
    except RecursionError:
        raise EdgeftError(f"{what} {path}: cannot parse it (nested too deeply)") from None
    except (tomllib.TOMLDecodeError, yaml.YAMLError, ValueError) as e:
        raise EdgeftError(f"{what} {path}: cannot parse it ({first_line(e)})") from None
    if not isinstance(data, dict):
        raise EdgeftError(f"{what} {path}: must hold a mapping of keys to values, not a {type(data).__name__}")
    bad = next((k for k in data if not isinstance(k, str)), None)
    if bad is not None:
        raise EdgeftError(f"{what} {path}: key {bad!r} is not a name; keys are setting names such as max_steps")
    check_unicode(data, f"{what} {path}", "save the file as valid UTF-8")
    return data


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _base_type(tp):
    """Optional[X] / X | None -> X."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def _coerce(value, tp, where: str):
    if value is None:
        return None
    tp = _base_type(tp)
    origin = typing.get_origin(tp)
    try:
        if origin in (list, tuple):
            (item,) = typing.get_args(tp)[:1] or (str,)
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise TypeError(value)
            return [_coerce(v, item, where) for v in value]
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if value not in (0, 1) or isinstance(value, float):  # True/False, or 0/1
                raise ValueError(value)
            return bool(value)
        if tp is int:
            # int(2.7) is 2: a float for an integer setting is refused unless it is whole (8.0).
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(value) if not isinstance(value, str) else int(value.strip())
        if tp is float:
            if isinstance(value, bool):
                raise ValueError(value)
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(value)
            return number
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError(value)
            return str(value)
    except (TypeError, ValueError, OverflowError):
        raise EdgeftError(f"{where}: {shown_value(value)} is not a valid {_type_name(tp)}") from None
    return value


def _in_range(value, f: dataclasses.Field, where: str):
    """A number against its field's `range` metadata, (low, high) with None for no bound and "<" marking an
    open end ("<1": below 1): numbers that cannot mean anything are refused before any work starts."""
    bounds = f.metadata.get("range")
    if bounds is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    low, high = bounds
    ok = ((low is None or value >= low) and
          (high is None or (value < float(high[1:]) if isinstance(high, str) else value <= high)))
    if not ok:
        upper = "" if high is None else (f" and below {high[1:]}" if isinstance(high, str) else f" and at most {high}")
        raise EdgeftError(f"{where}: {shown_value(value)} is out of range; use a number of at least {low}{upper}")
    return value


def _type_name(tp) -> str:
    if tp is int:
        return "int (a whole number)"
    if tp is float:
        return "float (a finite number)"
    return getattr(tp, "__name__", str(tp))


def aliases(cls) -> dict[str, str]:
    """Old setting names still accepted (for one release) -> their current names: a config class lists
    them in a class attribute ALIASES. Flags, config files and Python keyword arguments (with
    `accepts_old_names`) all take them, each with a one-line deprecation note on stderr."""
    return dict(getattr(cls, "ALIASES", {}))


def _deprecated(old: str, new: str) -> None:
    print(f"note: {old} is deprecated; use {new}", file=sys.stderr)


def _renamed(cls, name: str, where: str) -> str:
    new = aliases(cls).get(name)
    if new is None:
        return name
    _deprecated(where.format(name.replace("_", "-")), where.format(new.replace("_", "-")))
    return new


def current_names(cls, record: dict) -> dict:
    """A stored record of settings (RUN/train_config.json) with old names renamed, silently: it was written
    by an earlier version, not typed by the user."""
    renames = aliases(cls)
    return {renames.get(k, k): v for k, v in record.items() if not (k in renames and renames[k] in record)}


def accepts_old_names(cls):
    """Class decorator (above @dataclass): the constructor takes the ALIASES too, so Python callers of the
    step functions (`TrainConfig(base=...)`) keep working for a release, as the flags do."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        for old, new in aliases(cls).items():
            if old in kwargs:
                if new in kwargs:
                    raise TypeError(f"{cls.__name__}: give {new}= only ({old}= is its old name)")
                _deprecated(f"{cls.__name__}({old}=...)", f"{cls.__name__}({new}=...)")
                kwargs[new] = kwargs.pop(old)
        init(self, *args, **kwargs)

    cls.__init__ = __init__
    return cls


def load_config(cls, path: str | Path | None = None, overrides: dict | None = None):
    """Build `cls` from defaults, then the file at `path`, then non-None `overrides`."""
    hints = _field_types(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data: dict = {}
    if path:
        raw = read_config_file(path)
        seen: dict[str, str] = {}
        for key, value in raw.items():
            name = _renamed(cls, key.replace("-", "_"), f"key '{{}}' in {path}")
            if name not in hints:
                raise EdgeftError(f"--config {path}: unknown key '{key}'; valid keys: {', '.join(names)}")
            if name in seen:
                raise EdgeftError(f"--config {path}: keys '{seen[name]}' and '{key}' are the same setting; keep "
                                  f"'{name}'")
            seen[name] = key
            data[name] = _in_range(_coerce(value, hints[name], f"--config {path}: key '{key}'"), fields[name],
                                   f"--config {path}: key '{key}'")
    given = {k for k, v in (overrides or {}).items() if v is not None}
    for key, value in (overrides or {}).items():
        if value is not None:
            new = _renamed(cls, key, "--{}")
            if new != key and new in given:
                raise EdgeftError(f"--{key.replace('_', '-')} and --{new.replace('_', '-')} are the same setting "
                                  f"(--{key.replace('_', '-')} is its old name); give --{new.replace('_', '-')} only")
            key = new
        elif key in aliases(cls):
            continue
        if key not in hints:
            raise EdgeftError(f"unknown setting '{key}' for {cls.__name__}; valid: {', '.join(names)}")
        if value is not None:
            data[key] = _in_range(_coerce(value, hints[key], f"--{key.replace('_', '-')}"), fields[key],
                                  f"--{key.replace('_', '-')}")
    missing = [f.name for f in dataclasses.fields(cls)
               if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data]
    if missing:
        raise EdgeftError(f"missing required setting(s): {', '.join('--' + m.replace('_', '-') for m in missing)}")
    return cls(**data)


def to_dict(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def config_options(cls, skip: tuple[str, ...] = ()):
    """A click decorator adding one --flag per dataclass field (help from field metadata). Every flag
    defaults to None so that only what the user typed overrides the config file."""
    hints = _field_types(cls)

    def decorate(fn):
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            tp = _base_type(hints[f.name])
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else None
            if default is not None and default != "":
                help_text += f"  [default: {default}]"
            if tp is bool:
                opt = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text)
            else:
                click_type = {int: int, float: float}.get(tp, str)
                opt = click.option(flag, f.name, type=click_type, default=None, help=help_text,
                                   metavar=f.metadata.get("metavar"))
            fn = opt(fn)
        for old, new in aliases(cls).items():  # hidden: they work, and say what replaced them
            click_type = {int: int, float: float}.get(_base_type(hints[new]), str)
            fn = click.option("--" + old.replace("_", "-"), old, type=click_type, default=None, hidden=True)(fn)
        return fn

    return decorate


def step_options(cls, skip: tuple[str, ...] = (), what: str = "the ledger entry"):
    """What every step command takes: one flag per config field, --config FILE and --json."""
    def decorate(fn):
        fn = click.option("--json", "as_json", is_flag=True, help=f"print {what} as JSON")(fn)
        fn = click.option("--config", "config_file", type=click.Path(), help="YAML/TOML file with these settings")(fn)
        return config_options(cls, skip)(fn)

    return decorate
