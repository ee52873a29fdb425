"""Shared machinery for stage configs: kebab-case TOML keys, strict validation, clear errors."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, ClassVar, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, ValidationError

ConfigT = TypeVar("ConfigT", bound="StageConfig")


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are refused, keys are kebab-case in TOML."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=_kebab,
        populate_by_name=True,
        validate_assignment=True,
        frozen=False,
    )
    dump_omit: ClassVar[dict[str, tuple[str, ...]]] = {}  # nested section -> fields left out of configs/defaults.toml
    flat_fields: ClassVar[tuple[str, ...]] = ()  # sub-models whose keys are written beside this model's own

    def to_toml_dict(self) -> dict[str, Any]:
        """The config as a plain dict with kebab-case keys (paths as strings)."""
        return self.model_dump(mode="json", by_alias=True)


class ConfigError(ValueError):
    """A config value was refused; the message names key, value and what is allowed."""


# Top-level tables a `--config` file may hold: one per stage (see configs/defaults.toml) and the deployment's.
KNOWN_SECTIONS: tuple[str, ...] = (
    "synth",
    "preprocess",
    "finetune",
    "vib",
    "train",
    "distill",
    "clinical",
    "predict",
    "federation",
    "evaluate",
    "deploy",
)


def _fields(kind: Any) -> dict[str, Any]:
    return dict(kind.model_fields) if isinstance(kind, type) and issubclass(kind, BaseModel) else {}


def _visible_keys(kind: Any) -> list[str]:
    """Kebab-case keys of a config model as written (the keys of flat fields are its options' own)."""
    flat = getattr(kind, "flat_fields", ())
    return [info.alias or _kebab(name) for name, info in _fields(kind).items() if not info.exclude and name not in flat]


def _tagged(annotation: Any, tag: str) -> Any:
    """The member of a union of models whose `name` field takes `tag`."""
    for member in get_args(annotation):
        name = _fields(member).get("name")
        if name is not None and tag in get_args(name.annotation):
            return member
    return None


def _resolve(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, list[str], str | None]:
    """The dotted key `loc` names as written, the keys allowed beside its last part, and the architecture chosen on
    the way (a flat field's union member is picked by its tag, which is not part of the written key)."""
    parts: list[str] = []
    current: Any = model
    allowed, parent_allowed, chosen = _visible_keys(model), _visible_keys(model), None
    i = 0
    while i < len(loc):
        part = loc[i]
        found = next((item for item in _fields(current).items() if part in (item[0], item[1].alias)), None)
        if found is not None and found[0] in getattr(current, "flat_fields", ()) and i + 1 < len(loc):
            chosen = str(loc[i + 1])
            member = _tagged(found[1].annotation, chosen)
            allowed = sorted(set(_visible_keys(current)) | set(_visible_keys(member)))
            current, i = member, i + 2
            continue
        parts.append(_kebab(part) if isinstance(part, str) else str(part))
        parent_allowed = allowed
        current = found[1].annotation if found is not None else None
        allowed = _visible_keys(current)
        i += 1
    return ".".join(parts), sorted(parent_allowed), chosen


def format_validation_error(
    error: ValidationError, model: type[BaseModel], prefix: str = "", source: str | None = None
) -> str:
    """Turn a pydantic error into lines naming the key, the value given and what is allowed."""
    lines = []
    where = f" (from {source})" if source else ""
    for item in error.errors():
        loc = tuple(item["loc"])
        path, allowed, chosen = _resolve(model, loc)
        key = ".".join(p for p in (prefix, path) if p)
        value = item.get("input")
        if item["type"] == "extra_forbidden":
            owner = f" for model '{chosen}'" if chosen else ""
            lines.append(f"unknown key '{key}'{where}{owner}; allowed keys here: {', '.join(allowed)}")
        elif item["type"] == "not_used":
            lines.append(f"'{key}'{where}: {item['msg']}")
        elif not loc:  # a check across several keys: the message names them
            section = f" in [{prefix}]" if prefix else ""
            lines.append(f"invalid settings{section}{where}: {item['msg'].removeprefix('Value error, ')}")
        elif item["type"] == "missing":
            lines.append(f"missing key '{key}'{where}: {item['msg']}")
        else:
            lines.append(f"invalid value for '{key}': {value!r}{where}: {item['msg']}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Parse one `a.b.c=value` override; the value is read as TOML, else kept as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. tiling.low-mpp=2.0)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return [_kebab(p) for p in key.split(".")], value


def _set_nested(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[path[-1]] = value


def _kebab_keys(data: Any) -> Any:
    if isinstance(data, dict):
        return {_kebab(str(k)): _kebab_keys(v) for k, v in data.items()}
    return data


def load_config(
    model: type[ConfigT],
    path: Path | str | None = None,
    section: str | None = None,
    overrides: list[str] | None = None,
    values: dict[str, Any] | None = None,
) -> ConfigT:
    """Build a stage config from defaults, an optional TOML file (one section), CLI values and overrides.

    Precedence, lowest first: model defaults, the TOML file, `values` (CLI flags), `overrides`
    (`--set key=value`). Raises ConfigError with every problem spelled out.
    """
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
        if section is not None:
            sections = (*KNOWN_SECTIONS, *(() if section in KNOWN_SECTIONS else (section,)))
            unknown = sorted(set(raw) - set(sections))
            if unknown:
                names = ", ".join(f"[{name}]" for name in unknown)
                known = ", ".join(f"[{name}]" for name in sections)
                raise ConfigError(f"config file {path}: unknown section {names}; known sections: {known}")
            raw = raw.get(section, {})
            if not isinstance(raw, dict):
                raise ConfigError(f"config file {path}: [{section}] must be a table")
        data = _kebab_keys(raw)
    for key, value in (values or {}).items():
        if value is not None:
            _set_nested(data, [_kebab(p) for p in key.split(".")], value)
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_nested(data, keys, value)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, prefix=section or "", source=source)) from None
