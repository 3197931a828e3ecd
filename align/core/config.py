"""Config dataclasses from YAML files and ``key=value`` command-line overrides.

Every method and component has a dataclass config with documented fields; this module turns
YAML and overrides into those dataclasses with type coercion, and reports unknown keys and
badly typed values with the field's dotted name, the value and what is accepted.  Range checks
live in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from align.core.errors import ConfigError, suggest

T = TypeVar("T")

_MISSING = object()


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} fields"
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, field: str) -> Any:
    """Convert ``value`` (from YAML or the command line) to the annotated type ``tp``."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        # A value already of a member's exact type keeps it (1.0 stays a float in int | float:
        # a fraction of the chain, not step 1); otherwise coercions are tried in declaration order.
        for member in args:
            if isinstance(member, type) and type(value) is member:
                return value
        for member in args:
            if member is type(None):
                continue
            try:
                return _coerce(value, member, field)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{field}={value!r} is not valid; accepted: {_type_name(tp)}")
    if origin is Literal:
        for choice in args:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise ConfigError(
            f"{field}={value!r} is not supported; accepted: {', '.join(repr(a) for a in args)}."
            f"{suggest(str(value), map(str, args))}"
        )
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}={value!r} must be a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=field)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{field}={value!r} must be a list ({_type_name(tp)})")
        if args and not (len(args) == 2 and args[1] is Ellipsis) and origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"{field}={value!r} must have {len(args)} items ({_type_name(tp)})")
            return tuple(_coerce(v, a, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{field}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{field}={value!r} must be a mapping ({_type_name(tp)})")
        key_t, val_t = args if args else (Any, Any)
        return {
            _coerce(k, key_t, f"{field}.{k}"): _coerce(v, val_t, f"{field}.{k}") for k, v in value.items()
        }
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{field}={value!r} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{field}={value!r} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{field}={value!r} must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{field}={value!r} must be a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{field}={value!r} must be a number")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{field}={value!r} must be a string")
    if tp is Path:
        return Path(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{field}={value!r} must be {_type_name(tp)}")


def field_types(cls: type) -> dict[str, Any]:
    """The resolved type annotation of every field of dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, coercing types; unknown keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or cls.__name__}: expected a mapping of fields, got {data!r}")
    types_by_name = field_types(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in types_by_name:
            raise ConfigError(
                f"unknown config key {dotted!r}; accepted keys"
                f"{' of ' + prefix if prefix else ''}: {', '.join(sorted(types_by_name))}."
                f"{suggest(str(key), types_by_name)}"
            )
        kwargs[key] = _coerce(value, types_by_name[key], dotted)
    try:
        config = cls(**kwargs)
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}.{exc}") from None
        raise
    if not prefix:
        _mark_explicit(config, _dotted_keys(data))
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML-serialisable dict of a config dataclass (tuples become lists)."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, Mapping):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v

    return plain(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed YAML value)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value (e.g. learning_rate=1e-4)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key; expected key=value or a.b=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with each ``key=value`` override applied (nested with dots)."""
    out = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with a clear error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of fields, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Load dataclass ``cls`` from an optional YAML file, then apply ``key=value`` overrides.

    The config remembers which fields the file and the overrides set (:func:`explicit_fields`), so
    that defaults a model recommends never replace what the user chose.
    """
    return from_dict(cls, apply_overrides(read_yaml(path) if path is not None else {}, overrides))


_EXPLICIT = "_explicit_fields"


def _dotted_keys(data: Mapping[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.add(dotted)
        if isinstance(value, Mapping):
            keys |= _dotted_keys(value, dotted + ".")
    return keys


def _mark_explicit(config: Any, keys: set[str] | frozenset[str] | None) -> None:
    if keys is None:
        config.__dict__.pop(_EXPLICIT, None)
    else:
        object.__setattr__(config, _EXPLICIT, frozenset(keys))


def explicit_fields(config: Any) -> frozenset[str] | None:
    """Dotted names of the fields the user set, for configs made from a mapping (:func:`load_config`,
    :func:`from_dict`); None when unknown (a config constructed directly in Python)."""
    return getattr(config, _EXPLICIT, None)


def replace_config(config: T, **changes: Any) -> T:
    """``dataclasses.replace`` that keeps the record of explicitly set fields (and adds ``changes``)."""
    new = dataclasses.replace(config, **changes)
    known = explicit_fields(config)
    _mark_explicit(new, None if known is None else set(known) | set(changes))
    return new


def is_explicit(config: Any, dotted: str) -> bool:
    """Whether the user set field ``dotted`` (e.g. ``draft.learning_rate``) of ``config``.

    Known exactly for configs made from a mapping (:func:`load_config`); for a config built in Python, a field that
    differs from its default counts as set (one equal to its default cannot be told apart).
    """
    known = explicit_fields(config)
    if known is not None:
        return dotted in known
    *path, name = dotted.split(".")
    owner = config
    for part in path:
        owner = getattr(owner, part)
    default = next(f for f in dataclasses.fields(owner) if f.name == name)
    return getattr(owner, name) != _default_of(default)


def save_config(config: Any, path: str | Path) -> None:
    """Write a config dataclass as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def field_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the ``Attributes:`` sections of a dataclass's docstrings (base classes too)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls: type) -> dict[str, str]:
    doc = cls.__dict__.get("__doc__") or ""
    import inspect

    doc = inspect.cleandoc(doc)
    docs: dict[str, str] = {}
    in_section, current = False, None
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped == "Attributes:":
            in_section = True
            continue
        if not in_section:
            continue
        if not stripped:
            current = None
            continue
        indent = len(line) - len(line.lstrip())
        if indent <= 4 and ":" in stripped and not stripped.startswith(("-", "*")):
            name, text = stripped.split(":", 1)
            if name.isidentifier():
                current = name
                docs[name] = text.strip()
                continue
        if current:
            docs[current] += " " + stripped
    return docs


def help_width() -> int:
    """Width to wrap help text to: the terminal's (as argparse does), between 60 and 140 columns."""
    import shutil

    return max(60, min(140, shutil.get_terminal_size((100, 24)).columns - 2))


def _wrap(text: str, width: int, indent: str, hanging: str) -> str:
    import textwrap

    return textwrap.fill(
        " ".join(text.split()), width=width, initial_indent=indent, subsequent_indent=hanging,
        break_long_words=False, break_on_hyphens=False,
    )


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _nested_type(f: dataclasses.Field, tp: Any) -> type | None:
    """The dataclass a field holds (its annotation, or the type of its default), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    default = _default_of(f)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        return type(default)
    return None


def _shared_section_base(types: list[type]) -> type | None:
    """The most general dataclass base with fields that two or more section types derive from (every method's base)."""
    found = None
    for t in types:
        for base in reversed(t.__mro__[1:]):
            if dataclasses.is_dataclass(base) and dataclasses.fields(base):
                if sum(issubclass(other, base) for other in types) >= 2:
                    if found is None or issubclass(found, base):
                        found = base
                    break
    return found


def _family_base(section: type, root: type, types: list[type]) -> type | None:
    """The base between ``section`` and ``root`` that other sections share too (a method family), else None."""
    for base in section.__mro__[1:]:
        if base is root:
            return None
        if (dataclasses.is_dataclass(base) and issubclass(base, root) and base is not root
                and sum(issubclass(other, base) for other in types) >= 2):
            return base
    return None


def _shown(value: Any) -> str:
    return repr(to_dict(value) if dataclasses.is_dataclass(value) else value)


def describe_config(cls: type, prefix: str = "", width: int | None = None) -> str:
    """Every field of a config dataclass (nested ones dotted) with type, default and description.

    Sections that share a base dataclass (the methods of ``align train``) are shown once: the base's
    fields with each section's default, then for each family of sections sharing a further base (the
    reward-backprop and the policy-gradient methods) that base's fields, then each section with only the
    fields of its own.  Lines
    are wrapped to ``width`` (default: the terminal's).
    """
    width = width or help_width()
    hints = field_types(cls)
    docs = field_docs(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    sections = {f.name: _nested_type(f, hints[f.name]) for f in fields}
    shared = _shared_section_base([t for t in sections.values() if t is not None])
    grouped = [f.name for f in fields if shared is not None and sections[f.name] is not None
               and issubclass(sections[f.name], shared)]
    lines: list[str] = []

    def field_line(name: str, tp: Any, default: str, text: str) -> str:
        head = f"{name} ({_type_name(tp)}, {default})"
        return _wrap(f"{head}: {text}" if text else head, width, "  ", "      ")

    for f in fields:
        name = f"{prefix}{f.name}"
        if f.name in grouped:
            if f.name != grouped[0]:
                continue
            lines.extend(_describe_sections(cls, prefix, grouped, shared, width, field_line))
            continue
        sub = sections[f.name]
        if sub is not None:
            lines.append(_wrap(f"{name}: {docs.get(f.name, '')}".rstrip(": "), width, "  ", "      "))
            lines.append(describe_config(sub, prefix=name + ".", width=width))
            continue
        lines.append(field_line(name, hints[f.name], f"default {_shown(_default_of(f))}", docs.get(f.name, "")))
    return "\n".join(lines)


def _describe_sections(cls, prefix, names, shared, width, field_line) -> list[str]:
    """The block of sections sharing ``shared``: common fields once (defaults per section), then per family of
    sections (a further shared base, e.g. the reward-backprop methods) the family's fields once, then each
    section's own fields."""
    instances = {n: _default_of(next(f for f in dataclasses.fields(cls) if f.name == n)) for n in names}
    docs = field_docs(cls)
    section = "SECTION"
    types = [type(instances[n]) for n in names]
    families: dict[type | None, list[str]] = {}
    for n in names:
        families.setdefault(_family_base(type(instances[n]), shared, types), []).append(n)

    def common_fields(base: type, members: list[str], skip: set[str]) -> list[str]:
        hints, base_docs, out = field_types(base), field_docs(base), []
        for f in dataclasses.fields(base):
            if not f.init or f.name in skip:
                continue
            values = {n: _shown(getattr(instances[n], f.name)) for n in members}
            if len(set(values.values())) == 1:
                default = f"default {next(iter(values.values()))}"
            else:
                default = "defaults: " + ", ".join(f"{n} {v}" for n, v in values.items())
            out.append(field_line(f"{section}.{f.name}", hints[f.name], default, base_docs.get(f.name, "")))
        return out

    root_fields = [f.name for f in dataclasses.fields(shared) if f.init]
    root_names = set(root_fields)
    example = f"{prefix}{names[0]}.{root_fields[0]}"
    lines = [_wrap(
        f"fields of every section {', '.join(prefix + n for n in names)} (set as {section}.FIELD, e.g. {example}=...):",
        width, "  ", "  ",
    )]
    lines += common_fields(shared, names, set())
    for family, members in families.items():
        known = set(root_names)
        if family is not None:
            summary = (inspect.cleandoc(family.__doc__ or "").splitlines() or [""])[0].rstrip(".")
            lines.append(_wrap(
                f"fields of the sections {', '.join(prefix + n for n in members)}" + (f" ({summary})" if summary else "")
                + ":", width, "  ", "  ",
            ))
            lines += common_fields(family, members, known)
            known |= {f.name for f in dataclasses.fields(family) if f.init}
        for n in members:
            sub = type(instances[n])
            lines.append(_wrap(f"{prefix}{n}: {docs.get(n, '')}".rstrip(": "), width, "  ", "      "))
            own_hints = field_types(sub)
            own_docs = field_docs(sub)
            for f in dataclasses.fields(sub):
                if f.init and f.name not in known:
                    default = f"default {_shown(_default_of(f))}"
                    lines.append(field_line(f"{prefix}{n}.{f.name}", own_hints[f.name], default, own_docs.get(f.name, "")))
    return lines
