"""The settings files written from the pydantic models: `configs/defaults.toml` and pyproject's Flower app config.

The models are the one source: every key, default and comment (a field's description) in those files is made
here, and `fedslide config dump --check` (run by the suite) fails when the files on disk differ.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import tomli_w
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from fedslide.common.config.base import StageConfig
from fedslide.common.config.distill import DistillConfig
from fedslide.common.config.evaluate import EvaluateConfig
from fedslide.common.config.federation import FederationConfig
from fedslide.common.config.finetune import FinetuneConfig
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import PreprocessConfig
from fedslide.common.config.synth import SynthConfig
from fedslide.common.config.train import TrainConfig
from fedslide.common.config.vib import VIBConfig
from fedslide.common.config.clinical import ClinicalConfig

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the source checkout: configs/ and pyproject.toml
DEFAULTS_FILE = Path("configs") / "defaults.toml"
PYPROJECT_FILE = Path("pyproject.toml")
APP_CONFIG_TABLE = "tool.flwr.app.config"

SECTIONS: tuple[tuple[str, type[StageConfig]], ...] = (
    ("synth", SynthConfig),
    ("preprocess", PreprocessConfig),
    ("finetune", FinetuneConfig),
    ("vib", VIBConfig),
    ("train", TrainConfig),
    ("distill", DistillConfig),
    ("clinical", ClinicalConfig),
    ("predict", PredictConfig),
    ("federation", FederationConfig),
    ("evaluate", EvaluateConfig),
)

_HEADER = """\
# fedslide defaults: every setting with its default value. Copy a section into your own
# file and pass it with --config; override single keys with --set key=value.
# Written by `fedslide config dump` from the pydantic models (common/config/): edit those, not this file."""

_APP_HEADER = """\
# Written by `fedslide config dump` from FederationConfig: edit common/config/, not this table.
# "" = unset (Flower has no null: the default applies); lists are comma-separated; nested keys read teacher.name;
# teacher.* and student.* list every architecture's options: only those of the chosen `name` may be set"""

_WIDTH = 118  # longest generated line (comments wrap above their key beyond it)
_ALIGN = 28  # column of inline comments


def toml_value(value: Any) -> str:
    """One value as TOML (arrays inline)."""
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table (e.g. one clinical variable)
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    return tomli_w.dumps({"v": value})[4:-1]


def _key(name: str, info: FieldInfo) -> str:
    return info.alias or name.replace("_", "-")


def _keyed(assign: str, comment: str) -> list[str]:
    """`assign` with its comment inline, or wrapped above it when the line would be too long."""
    if not comment:
        return [assign]
    inline = f"{assign:<{_ALIGN - 1}} # {comment}"
    if len(inline) <= _WIDTH:
        return [inline]
    return [f"# {line}" for line in textwrap.wrap(comment, _WIDTH - 2)] + [assign]


def _comment(info: FieldInfo) -> str:
    """A field's description, with its choices when the description does not already name them all."""
    text = info.description or ""
    annotation = info.annotation
    if get_origin(annotation) in (list, tuple) and get_args(annotation):
        annotation = get_args(annotation)[0]
    if get_origin(annotation) is Literal:
        choices = [str(c) for c in get_args(annotation)]
        if not all(c in text for c in choices):
            text = f"{text} [{' | '.join(choices)}]".strip()
    return text


def _unset(example: str, key: str, description: str) -> list[str]:
    note = "" if "default" in description or "unset" in description else " (unset by default)"
    return _keyed(f"# {key} = {example}", f"{description}{note}".strip())


def _doc(text: str | None) -> list[str]:
    return [f"# {line}".rstrip() for line in inspect.cleandoc(text or "").splitlines()]


def _line(key: str, info: FieldInfo, value: Any, prefix: str = "") -> list[str]:
    """One key: its value and description; commented out when required, unset or filled from the data."""
    description = _comment(info)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    example = toml_value(info.examples[0]) if info.examples else "..."
    if prefix:  # a key of the catalogue of other choices
        return _keyed(f"{prefix}{key} = {example if value is None else toml_value(value)}", description)
    if info.is_required():
        return _keyed(f"# {key} = {example}", f"required; {description}" if description else "required")
    if value is None:
        return _unset(example, key, description)
    if extra.get("dump") == "commented":
        return _keyed(f"# {key} = {toml_value(value)}", description)
    return _keyed(f"{key} = {toml_value(value)}", description)


def _catalogue(annotation: Any, chosen: str) -> list[str]:
    """Commented-out keys of every other member of a flat field's union (each other architecture's options)."""
    lines: list[str] = []
    for member in get_args(annotation):
        tags = [str(t) for t in get_args(member.model_fields["name"].annotation)]
        fields = [(n, i) for n, i in member.model_fields.items() if not i.exclude]
        if chosen in tags or not fields:
            continue
        lines.append(f"# name = {' | '.join(toml_value(t) for t in tags)}: {inspect.cleandoc(member.__doc__ or '')}")
        for name, info in fields:
            lines += _line(_key(name, info), info, info.get_default(call_default_factory=True), prefix="#   ")
    return lines


def _table(
    header: str, model: BaseModel, comment: list[str], seen: dict[str, str], omit: tuple[str, ...] = ()
) -> list[str]:
    """`[header]` with every field of `model`: scalars first (a flat field's keys beside them), then each nested
    model as its own table. `seen`: flat field -> the table whose catalogue of the other members' keys was written."""
    values = model.model_dump(mode="json", by_alias=True)
    lines = [f"[{header}]", *comment]
    nested: list[tuple[str, FieldInfo]] = []
    flat_fields = getattr(type(model), "flat_fields", ())
    for name, info in type(model).model_fields.items():
        if info.exclude or name in omit:
            continue
        child = getattr(model, name, None)
        if name in flat_fields and isinstance(child, BaseModel):
            for sub, sub_info in type(child).model_fields.items():
                if not sub_info.exclude:
                    lines += _line(_key(sub, sub_info), sub_info, values.get(_key(sub, sub_info)))
            if name in seen:
                lines.append(f"# the other architectures take other keys: see [{seen[name]}]")
            else:
                seen[name] = header
                lines += [
                    "# the keys of the other architectures, at their defaults:",
                    *_catalogue(info.annotation, str(getattr(child, "name", ""))),
                ]
            continue
        if isinstance(child, BaseModel):
            nested.append((name, info))
            continue
        lines += _line(_key(name, info), info, values.get(_key(name, info)))
    omitted = getattr(type(model), "dump_omit", {})
    for name, info in nested:
        child = getattr(model, name)
        text = info.description or inspect.cleandoc(type(child).__doc__ or "")
        lines += ["", *_table(f"{header}.{_key(name, info)}", child, _doc(text), seen, tuple(omitted.get(name, ())))]
    return lines


def defaults_toml() -> str:
    """The text of `configs/defaults.toml`: every stage's section at its defaults, with the descriptions."""
    lines = [_HEADER]
    seen: dict[str, str] = {}
    for section, model in SECTIONS:
        lines += ["", *_table(section, model.model_construct(), _doc(model.__doc__), seen)]
    return "\n".join(lines) + "\n"


def _describe(model: type[BaseModel], dotted: str) -> str:
    """The comment of a flat run-config key (`teacher.hidden-dim`); a flat field's key names the members taking it."""
    current: Any = model
    info: FieldInfo | None = None
    for part in dotted.split("."):
        fields = current.model_fields if isinstance(current, type) and issubclass(current, BaseModel) else {}
        info = next((f for n, f in fields.items() if part in (n, f.alias, n.replace("_", "-"))), None)
        if info is None:
            takers = [
                (member, member.model_fields[part.replace("-", "_")])
                for flat in getattr(current, "flat_fields", ())
                for member in get_args(fields[flat].annotation)
                if part.replace("-", "_") in member.model_fields
            ]
            if not takers:
                return ""
            said: dict[str, list[str]] = {}  # description -> the architectures it describes
            for member, field in takers:
                said.setdefault(_comment(field), []).extend(map(str, get_args(member.model_fields["name"].annotation)))
            return "; ".join(f"{', '.join(tags)}: {text}" for text, tags in said.items())
        current = info.annotation
    return _comment(info) if info is not None else ""


def run_config_defaults() -> dict[str, Any]:
    """Every run-config key at its default ("" = unset): pyproject's app config and an installed app's manifest."""
    return FederationConfig().to_run_config(unset="")


def app_config_toml() -> str:
    """pyproject's `[tool.flwr.app.config*]` tables: the run config in Flower's flat form, with descriptions."""
    tables: dict[str, list[tuple[str, Any]]] = {}
    for key, value in run_config_defaults().items():
        table, _, name = key.rpartition(".")
        tables.setdefault(table, []).append((key, value))
    lines: list[str] = []
    for table, items in tables.items():
        if lines:
            lines.append("")
        lines.append(f"[{APP_CONFIG_TABLE}{'.' + table if table else ''}]")
        if not table:
            lines += _APP_HEADER.splitlines()
        for key, value in items:
            lines += _keyed(f"{key.rpartition('.')[2]} = {toml_value(value)}", _describe(FederationConfig, key))
    return "\n".join(lines) + "\n"


def _is_app_config_header(line: str) -> bool:
    stripped = line.strip()
    return stripped == f"[{APP_CONFIG_TABLE}]" or stripped.startswith(f"[{APP_CONFIG_TABLE}.")


def replace_app_config(pyproject: str, block: str) -> str:
    """`pyproject` with its `[tool.flwr.app.config*]` tables replaced by `block`; every other byte kept.

    The block runs from `[tool.flwr.app.config]` to the next other table, less the comments just above that
    table (they belong to it)."""
    lines = pyproject.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == f"[{APP_CONFIG_TABLE}]"), None)
    if start is None:
        raise ValueError(f"{PYPROJECT_FILE} has no [{APP_CONFIG_TABLE}] table")
    end = start + 1
    while end < len(lines) and not (lines[end].lstrip().startswith("[") and not _is_app_config_header(lines[end])):
        end += 1
    while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].lstrip().startswith("#")):
        end -= 1
    tail = lines[end:]
    while tail and not tail[0].strip():  # one blank line between the block and what follows
        tail.pop(0)
    return "".join(lines[:start]) + block + ("\n" if tail else "") + "".join(tail)


@dataclass(frozen=True)
class Written:
    """One generated file: where it goes and what it holds."""

    path: Path
    text: str


def generated_files(root: Path = SOURCE_ROOT) -> list[Written]:
    """What `fedslide config dump` writes under the source checkout `root`."""
    pyproject = root / PYPROJECT_FILE
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject} not found: `fedslide config dump` writes into a source checkout")
    return [
        Written(root / DEFAULTS_FILE, defaults_toml()),
        Written(pyproject, replace_app_config(pyproject.read_text(), app_config_toml())),
    ]


def stale_files(root: Path = SOURCE_ROOT) -> list[Path]:
    """The generated files whose text on disk differs from what the models give (empty: all current)."""
    return [w.path for w in generated_files(root) if not w.path.is_file() or w.path.read_text() != w.text]


def write_files(root: Path = SOURCE_ROOT) -> list[Path]:
    """Write the generated files that differ; the paths written."""
    written = []
    for w in generated_files(root):
        if not w.path.is_file() or w.path.read_text() != w.text:
            w.path.write_text(w.text)
            written.append(w.path)
    return written
