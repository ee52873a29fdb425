"""The student bundle: everything low-res inference needs (adapter, student, teacher, provenance).

On disk (`directory/`): `bundle.json` (format + BundleMeta), `adapter.pt`, `student.pt` and
`teacher.pt`, each a plain dict (`state_dict` + config dict) readable with
`torch.load(weights_only=True)`. `adapter.pt` / `teacher.pt` are absent when the bundle has none.

When the student was trained on 5× features of a fine-tuned low-res encoder (`fedslide finetune`), the meta
records that encoder's weights hash (`low_encoder_weights_hash`; `encoder_weights_hash` stays the frozen
high-res encoder's) and `low_encoder.pt` holds its weights file byte for byte, so its sha256 is that hash.
A bundle may instead carry the hash only; the site then supplies the file (`predict.low-encoder-weights`).
When the encoder of BOTH levels was fine-tuned (federated pixel stage 1 with the VIB objective), both feature levels
record its hash as `encoder_weights_hash` (no `low_encoder_weights_hash`) and `encoder.pt` holds its weights file
byte for byte; prediction then encodes both levels with it.

student.pt and teacher.pt may also carry the model's input standardisation and logit temperature
(`common.training.scaling.ModelScaling`: keys `standardize`, `temperature`); predict_low / predict_high apply
them, and a file without them (an older bundle) predicts with raw inputs and T = 1.

`meta.stain_normalization` is the stain normaliser's identity (method + inline reference) that the training
feature files record; inference rebuilds it and normalises every patch it encodes (absent = no normalisation).

`ood.json` (optional) holds the training slides' low-res feature statistics and the out-of-distribution flag
threshold chosen on validation slides (`common.distillation.ood`); absent in older bundles: no OOD score.

`clinical.pt` (optional) is a bidirectional-distillation model reading the student's instances plus a clinical
row, with its clinical schema and normalisation (`common.distillation.clinical_model`); absent: no clinical model.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedslide.common.atomic import atomic_path, write_text_atomic
from fedslide.common.config.model import ModelConfig
from fedslide.common.distillation.adapter import CrossResAdapter, build_adapter
from fedslide.common.distillation.clinical_model import CLINICAL_MODEL_FILE, ClinicalModel
from fedslide.common.distillation.instances import (
    MissingTokensError,
    estimate_patch_size_level0,
    instance_coords,
    student_instances,
)
from fedslide.common.features import NO_STAIN
from fedslide.common.distillation.ood import OOD_FILE, OODStats
from fedslide.common.models.base import MILModel, MILOutput
from fedslide.common.models.registry import build_model
from fedslide.common.training.scaling import ModelScaling

BUNDLE_FORMAT = "fedslide.student-bundle/1"
BUNDLE_FILE = "bundle.json"
ADAPTER_FILE = "adapter.pt"
STUDENT_FILE = "student.pt"
TEACHER_FILE = "teacher.pt"
LOW_ENCODER_FILE = "low_encoder.pt"
ENCODER_FILE = "encoder.pt"
_MPP_TOLERANCE = 0.05


class BundleMismatchError(ValueError):
    """Features (or their encoder / resolution) differ from those the bundle was trained on."""


@dataclass
class BundleMeta:
    """Provenance of a bundle: the encoder, resolutions and tiling its models were trained on (JSON-serialisable)."""

    encoder_name: str
    encoder_weights_hash: str
    encoder_dim: int
    encoder_fingerprint: str | None
    low_mpp: float
    low_patch_size: int
    high_mpp: float
    high_patch_size: int
    child_grid: int
    token_grid: int
    student_input: str  # "tokens" | "pooled" | "raw"
    class_names: list[str]
    tissue: dict[str, Any]
    tiling: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # run facts (model name, temperature, ...)
    low_encoder_weights_hash: str | None = None  # fine-tuned 5x encoder's sha256; None = the same as encoder_*
    low_encoder_fingerprint: str | None = None
    # the stain normaliser's identity the training features were encoded with (feature files' STAIN_ATTR);
    # inference normalises its patches the same way. Absent in older bundles: no normalisation.
    stain_normalization: dict[str, Any] = field(default_factory=lambda: dict(NO_STAIN))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "BundleMeta":
        """Inverse of to_dict (unknown keys are kept under `extra`)."""
        known = {f.name for f in fields(cls)}
        meta = cls(**{k: v for k, v in data.items() if k in known})
        unknown = {k: v for k, v in data.items() if k not in known}
        if unknown:
            meta.extra = {**meta.extra, **unknown}
        return meta

    @property
    def encoder_label(self) -> str:
        """`name (hash 1234abcd…)` for messages."""
        return _encoder_label(self.encoder_name, self.encoder_weights_hash)

    @property
    def low_finetuned(self) -> bool:
        """Whether the low-res features come from a fine-tuned encoder other than the high-res one."""
        return bool(self.low_encoder_weights_hash) and self.low_encoder_weights_hash != self.encoder_weights_hash

    def expected_encoder(self, resolution: str) -> tuple[str, str | None]:
        """(weights hash, fingerprint) the `resolution` ("low" / "high") features must have been made with."""
        if resolution == "low" and self.low_finetuned:
            return str(self.low_encoder_weights_hash), self.low_encoder_fingerprint
        return self.encoder_weights_hash, self.encoder_fingerprint

    def encoder_label_for(self, resolution: str) -> str:
        """`name (weights 1234abcd…)` of the encoder of one resolution, for messages."""
        return _encoder_label(self.encoder_name, self.expected_encoder(resolution)[0])


def _short(value: Any) -> str:
    text = str(value or "")
    return text[:12] if text else "unknown"


def _encoder_label(name: Any, weights_hash: Any) -> str:
    return f"{name or 'unknown encoder'} (weights {_short(weights_hash)})"


def file_sha256(path: Path | str) -> str:
    """Hex sha256 of a file's bytes (an encoder weights file's hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_low_encoder_file(meta: BundleMeta, path: Path | str) -> None:
    """Refuse a fine-tuned low-res encoder weights file whose sha256 is not the bundle's; names both."""
    actual = file_sha256(path)
    if actual != meta.low_encoder_weights_hash:
        raise BundleMismatchError(
            f"low-res encoder weights {path} have sha256 {_short(actual)}, but the bundle's student was trained "
            f"on 5x features of {meta.encoder_name} with fine-tuned weights {_short(meta.low_encoder_weights_hash)}; "
            "supply the weights `fedslide finetune` wrote for this bundle (SITE/finetune/<encoder>.pt)"
        )


def find_low_encoder_weights(meta: BundleMeta, site_dirs: list[Path]) -> Path | None:
    """The fine-tuned 5x weights `fedslide finetune` left at a site (`SITE/finetune/<encoder>.pt`) whose sha256
    is the meta's low-res hash; None when the student's encoder is not fine-tuned or no site has the file."""
    if not meta.low_finetuned:
        return None
    for site in site_dirs:
        path = Path(site) / "finetune" / f"{meta.encoder_name}.pt"
        if path.is_file() and file_sha256(path) == meta.low_encoder_weights_hash:
            return path
    return None


def find_encoder_weights(meta: BundleMeta, site_dirs: list[Path]) -> Path | None:
    """The VIB-fine-tuned weights of both levels `fedslide finetune --method vib` left at a site
    (`SITE/vib/<encoder>.pt`) whose sha256 is the meta's encoder hash; None when no site has such a file (the
    encoder's own weights, supplied at prediction)."""
    for site in site_dirs:
        path = Path(site) / "vib" / f"{meta.encoder_name}.pt"
        if path.is_file() and file_sha256(path) == meta.encoder_weights_hash:
            return path
    return None


def _reduce_attention(out: MILOutput, m: int) -> torch.Tensor:
    """Per-instance attention [M] of one bag: heads / classes averaged; uniform when the model has none."""
    att = out.attention
    if att is None:
        return torch.full((m,), 1.0 / max(m, 1))
    att = att.detach().float()
    if att.dim() == 3:
        att = att.mean(dim=1)
    att = att.reshape(-1)
    if att.numel() != m:
        return torch.full((m,), 1.0 / max(m, 1))
    return att.cpu()


def _save_model(
    path: Path, model: nn.Module, config: dict[str, Any], kind: str, scaling: ModelScaling | None = None
) -> None:
    payload = {
        "format": BUNDLE_FORMAT,
        "kind": kind,
        "config": config,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **(scaling.to_payload() if scaling is not None else {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_payload(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path} is not part of a fedslide student bundle ({BUNDLE_FORMAT})")
    return payload


def _model_config(model: MILModel, config: ModelConfig | dict[str, Any] | None) -> dict[str, Any]:
    if config is None:
        config = getattr(model, "model_config", None)
    if config is None:
        raise ValueError("a bundle model needs its ModelConfig (pass it, or set model.model_config)")
    return config.model_dump(mode="json") if isinstance(config, ModelConfig) else dict(config)


class StudentBundle:
    """Adapter + low-res student (+ high-res teacher) with their provenance; ready for inference."""

    def __init__(
        self,
        meta: BundleMeta,
        adapter: CrossResAdapter | None,
        student: MILModel,
        teacher: MILModel | None = None,
        student_config: ModelConfig | dict[str, Any] | None = None,
        teacher_config: ModelConfig | dict[str, Any] | None = None,
        low_encoder_weights: Path | str | None = None,
        student_scaling: ModelScaling | None = None,
        teacher_scaling: ModelScaling | None = None,
        ood: OODStats | None = None,
        encoder_weights: Path | str | None = None,
        clinical: ClinicalModel | None = None,
    ):
        """`low_encoder_weights`: the fine-tuned 5x encoder's weights file (its sha256 must be the meta's);
        `encoder_weights`: the weights file of the encoder of both levels (sha256 = meta.encoder_weights_hash), for
        an encoder fine-tuned at both levels (VIB); None: the encoder's own weights, supplied at prediction;
        `student_scaling` / `teacher_scaling`: standardisation of the instances each model reads (the student's
        are its adapted instances) and its temperature; None = identity; `ood`: the training slides' low-res
        statistics and the OOD threshold (None: no OOD score); `clinical`: a BD model reading the student's instances
        and clinical rows (None: none)."""
        if meta.student_input != "raw" and adapter is None:
            raise ValueError(f"student input {meta.student_input!r} needs an adapter")
        self.meta = meta
        self.adapter = adapter.eval() if adapter is not None else None
        self.student = student.eval()
        self.teacher = teacher.eval() if teacher is not None else None
        self.student_config = _model_config(student, student_config)
        self.teacher_config = None if teacher is None else _model_config(teacher, teacher_config)
        self.student_scaling = student_scaling or ModelScaling()
        self.teacher_scaling = teacher_scaling or ModelScaling()
        self.ood = ood
        self.clinical = clinical
        if clinical is not None:
            clinical.check_bundle(Path(CLINICAL_MODEL_FILE), meta.encoder_dim, len(meta.class_names))
        self.low_encoder_weights: Path | None = None
        if low_encoder_weights is not None:
            if not meta.low_finetuned:
                raise ValueError(
                    "a low-res encoder weights file needs meta.low_encoder_weights_hash (a fine-tuned encoder "
                    f"other than the high-res one, weights {_short(meta.encoder_weights_hash)})"
                )
            check_low_encoder_file(meta, low_encoder_weights)
            self.low_encoder_weights = Path(low_encoder_weights)
        self.encoder_weights: Path | None = None
        if encoder_weights is not None:
            actual = file_sha256(encoder_weights)
            if actual != meta.encoder_weights_hash:
                raise BundleMismatchError(
                    f"{encoder_weights}: weights {_short(actual)}, but the bundle's models were trained on features "
                    f"of {meta.encoder_label}; the encoder weights file must be those weights byte for byte"
                )
            self.encoder_weights = Path(encoder_weights)

    # ---- persistence -------------------------------------------------------------------------
    def save(self, directory: Path | str) -> None:
        """Write bundle.json, adapter.pt, student.pt and teacher.pt into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self.adapter is not None:
            _save_model(directory / ADAPTER_FILE, self.adapter, self.adapter.spec.to_dict(), "adapter")
        else:
            (directory / ADAPTER_FILE).unlink(missing_ok=True)
        _save_model(directory / STUDENT_FILE, self.student, self.student_config, "student", self.student_scaling)
        if self.teacher is not None and self.teacher_config is not None:
            _save_model(directory / TEACHER_FILE, self.teacher, self.teacher_config, "teacher", self.teacher_scaling)
        else:
            (directory / TEACHER_FILE).unlink(missing_ok=True)
        low_target = directory / LOW_ENCODER_FILE
        if self.low_encoder_weights is not None:
            if self.low_encoder_weights.resolve() != low_target.resolve():
                with atomic_path(low_target) as tmp:
                    shutil.copyfile(self.low_encoder_weights, tmp)
            self.low_encoder_weights = low_target
        else:
            low_target.unlink(missing_ok=True)
        encoder_target = directory / ENCODER_FILE
        if self.encoder_weights is not None:
            if self.encoder_weights.resolve() != encoder_target.resolve():
                with atomic_path(encoder_target) as tmp:
                    shutil.copyfile(self.encoder_weights, tmp)
            self.encoder_weights = encoder_target
        else:
            encoder_target.unlink(missing_ok=True)
        if self.ood is not None:
            self.ood.save(directory / OOD_FILE)
        else:
            (directory / OOD_FILE).unlink(missing_ok=True)
        if self.clinical is not None:
            self.clinical.save(directory / CLINICAL_MODEL_FILE)
        else:
            (directory / CLINICAL_MODEL_FILE).unlink(missing_ok=True)
        doc = {
            "format": BUNDLE_FORMAT,
            "meta": self.meta.to_dict(),
            "files": {
                "adapter": ADAPTER_FILE if self.adapter is not None else None,
                "student": STUDENT_FILE,
                "teacher": TEACHER_FILE if self.teacher is not None else None,
                "low_encoder": LOW_ENCODER_FILE if self.low_encoder_weights is not None else None,
                "encoder": ENCODER_FILE if self.encoder_weights is not None else None,
                "ood": OOD_FILE if self.ood is not None else None,
                "clinical": CLINICAL_MODEL_FILE if self.clinical is not None else None,
            },
        }
        write_text_atomic(directory / BUNDLE_FILE, json.dumps(doc, indent=2, sort_keys=False) + "\n")

    @classmethod
    def load(cls, directory: Path | str, map_location: str | torch.device = "cpu") -> "StudentBundle":
        """Read a bundle written by `save` (weights-only unpickling); models are in eval mode."""
        directory = Path(directory)
        doc_path = directory / BUNDLE_FILE
        if not doc_path.is_file():
            raise FileNotFoundError(f"{directory} is not a student bundle: {BUNDLE_FILE} is missing")
        doc = json.loads(doc_path.read_text())
        if doc.get("format") != BUNDLE_FORMAT:
            raise ValueError(f"{doc_path}: unknown bundle format {doc.get('format')!r} (expected {BUNDLE_FORMAT})")
        meta = BundleMeta.from_dict(doc["meta"])
        files = doc.get("files", {})
        adapter = None
        if files.get("adapter"):
            payload = _load_payload(directory / files["adapter"], map_location)
            adapter = build_adapter(payload["config"])
            adapter.load_state_dict(payload["state_dict"])
        student_payload = _load_payload(directory / files.get("student", STUDENT_FILE), map_location)
        student_cfg = ModelConfig.model_validate(student_payload["config"])
        student = build_model(student_cfg)
        student.load_state_dict(student_payload["state_dict"])
        teacher, teacher_cfg, teacher_scaling = None, None, None
        if files.get("teacher"):
            teacher_payload = _load_payload(directory / files["teacher"], map_location)
            teacher_cfg = ModelConfig.model_validate(teacher_payload["config"])
            teacher = build_model(teacher_cfg)
            teacher.load_state_dict(teacher_payload["state_dict"])
            teacher_scaling = ModelScaling.from_payload(teacher_payload)
        low_encoder = directory / files["low_encoder"] if files.get("low_encoder") else None
        encoder = directory / files["encoder"] if files.get("encoder") else None
        ood = OODStats.load(directory / files["ood"]) if files.get("ood") else None
        if ood is not None and ood.dim != meta.encoder_dim:
            raise ValueError(
                f"{directory / OOD_FILE}: {ood.dim} features, but the bundle's encoder has {meta.encoder_dim}"
            )
        clinical = None
        if files.get("clinical"):
            clinical = ClinicalModel.load(directory / files["clinical"], map_location)
            clinical.check_bundle(directory / files["clinical"], meta.encoder_dim, len(meta.class_names))
        return cls(
            meta,
            adapter,
            student,
            teacher,
            student_cfg,
            teacher_cfg,
            low_encoder,
            ModelScaling.from_payload(student_payload),
            teacher_scaling,
            ood,
            encoder,
            clinical,
        )

    # ---- checks ------------------------------------------------------------------------------
    def check_features(self, attrs: dict[str, Any]) -> None:
        """Refuse a feature file whose encoder (or resolution) differs from the bundle's; names both."""
        m = self.meta
        resolution = attrs.get("resolution")
        our_hash, our_fingerprint = m.expected_encoder(str(resolution))
        ours_label = m.encoder_label_for(str(resolution))
        theirs = _encoder_label(attrs.get("encoder_name"), attrs.get("encoder_weights_hash"))
        where = f" ({attrs['slide_id']})" if attrs.get("slide_id") else ""
        conflicts = []
        for key, ours in (("encoder_name", m.encoder_name), ("encoder_weights_hash", our_hash)):
            value = attrs.get(key)
            if value not in (None, "") and ours and str(value) != str(ours):
                conflicts.append(key)
        fingerprint = attrs.get("encoder_fingerprint")
        if fingerprint and our_fingerprint and str(fingerprint) != our_fingerprint:
            conflicts.append("encoder_fingerprint")
        dim = attrs.get("encoder_dim")
        if dim not in (None, "") and int(dim) != int(m.encoder_dim):
            conflicts.append(f"encoder_dim {int(dim)} vs {m.encoder_dim}")
        if conflicts:
            if "encoder_fingerprint" in conflicts:
                theirs += f" [fingerprint {_short(fingerprint)}]"
                ours_label += f" [fingerprint {_short(our_fingerprint)}]"
            raise BundleMismatchError(
                f"features{where} were made by encoder {theirs}, but the bundle was trained on encoder "
                f"{ours_label} (differs in: {', '.join(conflicts)}); re-encode the slides with "
                f"{m.encoder_name} or use a bundle trained on {attrs.get('encoder_name') or 'that encoder'}"
            )
        mpp = attrs.get("target_mpp")
        if resolution in ("low", "high") and mpp not in (None, ""):
            expected = m.low_mpp if resolution == "low" else m.high_mpp
            if expected and not math.isclose(float(mpp), float(expected), rel_tol=_MPP_TOLERANCE):
                raise BundleMismatchError(
                    f"{resolution}-res features{where} are at {float(mpp):g} µm/px, but the bundle was trained "
                    f"on {resolution}-res features at {float(expected):g} µm/px (encoder {m.encoder_label})"
                )

    # ---- inference ---------------------------------------------------------------------------
    @property
    def uses_tokens(self) -> bool:
        """Whether the student's instances are built from low-res tokens."""
        return self.meta.student_input == "tokens" or (self.meta.student_input == "pooled" and self.meta.token_grid > 0)

    def student_instances(
        self, features: torch.Tensor, tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(instances [M, E], low_index [M], slot [M]) the student reads for low features [N, D] / tokens [N, T, D]."""
        features = torch.as_tensor(features, dtype=torch.float32)
        if tokens is not None:
            tokens = torch.as_tensor(tokens).float()
        if self.uses_tokens and tokens is None:
            raise BundleMismatchError(
                f"this bundle's student reads {self.meta.student_input!r} instances built from low-res tokens "
                f"(token grid {self.meta.token_grid}), but no tokens were given; re-run preprocessing with "
                f"encoder {self.meta.encoder_name} and encoder.write-tokens = true"
            )
        if features.shape[-1] != self.meta.encoder_dim:
            raise BundleMismatchError(
                f"features have dim {features.shape[-1]} but the bundle's encoder {self.meta.encoder_label} "
                f"has dim {self.meta.encoder_dim}"
            )
        try:
            return student_instances(self.adapter, self.meta.student_input, features, tokens, self.uses_tokens)
        except MissingTokensError as exc:  # pragma: no cover - guarded above
            raise BundleMismatchError(str(exc)) from None

    @torch.inference_mode()
    def predict_low(
        self,
        features: torch.Tensor,
        tokens: torch.Tensor | None = None,
        coords: torch.Tensor | None = None,
        low_patch_size_level0: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Low-res-only prediction: (probs [C], attention [M], low_index [M], slot [M]); the student's scaling
        (standardisation of its instances, temperature) applied.

        `coords` [N, 2] are the low patches' level-0 corners; token instances get their child's
        corner, using `low_patch_size_level0` (estimated from the coords' grid step when None).
        """
        instances, low_index, slot = self.student_instances(features, tokens)
        inst_coords = None
        if coords is not None:
            coords = torch.as_tensor(coords)
            size = low_patch_size_level0
            if size is None and self.meta.student_input == "tokens":
                size = estimate_patch_size_level0(coords) or float(self.meta.low_patch_size)
            grid = self.meta.token_grid if self.meta.student_input == "tokens" else 0
            inst_coords = instance_coords(coords, low_index, slot, grid, size or 0.0)[None]
        out = self.student(self.student_scaling.inputs(instances[None]), coords=inst_coords)
        probs = self.student_scaling.probs(out.logits).float()[0].cpu()
        return probs, _reduce_attention(out, instances.shape[0]), low_index.cpu(), slot.cpu()

    @torch.inference_mode()
    def predict_high(
        self, features: torch.Tensor, coords: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """High-res prediction with the teacher, its scaling applied: (probs [C], attention [K])."""
        if self.teacher is None:
            raise ValueError("this bundle has no high-res teacher")
        features = torch.as_tensor(features, dtype=torch.float32)
        if features.shape[-1] != self.meta.encoder_dim:
            raise BundleMismatchError(
                f"high-res features have dim {features.shape[-1]} but the bundle's encoder {self.meta.encoder_label} "
                f"has dim {self.meta.encoder_dim}"
            )
        c = None if coords is None else torch.as_tensor(coords).float()[None]
        out = self.teacher(self.teacher_scaling.inputs(features[None]), coords=c)
        probs = self.teacher_scaling.probs(out.logits).float()[0].cpu()
        return probs, _reduce_attention(out, features.shape[0])
