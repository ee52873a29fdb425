"""The hospital's privacy floors: limits a site sets in its SuperNode's `--node-config`, below which it refuses a run.

The coordinator's run config (`FederationConfig`) chooses suppression, DP and mode; the site's floors bound those
choices, and a run that goes below them is refused before any of the site's data is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, field_validator
from pydantic import ValidationError

from fedslide.common.config.base import ConfigError, format_validation_error
from fedslide.common.config.federation import FederationConfig

Mode = Literal["weights", "logits"]


class SiteRefusal(RuntimeError):
    """A site refuses a run: `code` is a fixed name, `message` fixed text about the run config (no site data)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message


class SiteFloors(BaseModel):
    """Privacy floors from the node config (kebab-case keys; every one optional)."""

    model_config = ConfigDict(extra="forbid", alias_generator=lambda name: name.replace("_", "-"), frozen=True)

    min_suppress_below: NonNegativeInt = Field(
        default=0, description="cluster statistics of fewer slides than this must be withheld"
    )
    require_dp: bool = Field(
        default=False, description="refuse runs without DP (dp-noise-multiplier or local-dp-noise-multiplier > 0)"
    )
    max_epsilon: PositiveFloat | None = Field(
        default=None, description="refuse runs whose DP budget (dp-max-epsilon) is unset or above this ε"
    )
    allowed_modes: tuple[Mode, ...] = Field(
        default=("weights", "logits"), min_length=1, description="federation modes the site joins (comma-separated)"
    )
    min_local_dp_noise_multiplier: NonNegativeFloat = Field(
        default=0.0,
        description="refuse runs whose site-side DP noise multiplier (local-dp-noise-multiplier) is below this",
    )
    max_local_epsilon: PositiveFloat | None = Field(
        default=None,
        description="site-side DP: refuse runs whose planned updates would spend more than this ε against the "
        "coordinator, and send no update beyond it",
    )
    cluster_noise_multiplier: NonNegativeFloat = Field(
        default=0.0,
        description="refuse runs whose cluster statistics are not clipped (cluster-clip-norm) with noise std of at "
        "least this multiple of the clip",
    )

    @field_validator("allowed_modes", mode="before")
    @classmethod
    def _split_modes(cls, value: Any) -> Any:
        return tuple(v.strip() for v in value.split(",") if v.strip()) if isinstance(value, str) else value

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> "SiteFloors":
        """The floors among the node config's keys (other keys, e.g. `site-dir`, are not floors)."""
        keys = {info.alias or name for name, info in cls.model_fields.items()}
        try:
            return cls.model_validate({k: v for k, v in node_config.items() if k in keys})
        except ValidationError as exc:
            raise ConfigError("node config: " + format_validation_error(exc, cls, source="--node-config")) from None

    def violations(self, cfg: FederationConfig) -> list[tuple[str, str]]:
        """(code, message) for every way the run config `cfg` goes below these floors (empty when it does not)."""
        found: list[tuple[str, str]] = []
        dp_on = cfg.dp_noise_multiplier > 0
        if cfg.min_count < self.min_suppress_below:
            found.append(
                (
                    "floor-suppress-below",
                    f"suppress-below = {cfg.min_count} is below this site's floor of {self.min_suppress_below}",
                )
            )
        if cfg.mode not in self.allowed_modes:
            found.append(
                ("floor-mode", f"mode = {cfg.mode!r} is not allowed here (allowed: {', '.join(self.allowed_modes)})")
            )
        if self.require_dp and not (dp_on or cfg.local_dp_noise_multiplier > 0):
            found.append(
                (
                    "floor-require-dp",
                    "this site requires DP: dp-noise-multiplier or local-dp-noise-multiplier must be > 0",
                )
            )
        if self.require_dp and cfg.mode == "logits":
            found.append(
                ("floor-dp-logits", "this site requires DP and logits mode sends un-noised logits: use mode 'weights'")
            )
        if self.max_epsilon is not None:
            if not dp_on or cfg.dp_max_epsilon is None:
                found.append(
                    ("floor-max-epsilon", f"this site allows at most ε = {self.max_epsilon}: set DP and dp-max-epsilon")
                )
            elif cfg.dp_max_epsilon > self.max_epsilon:
                found.append(
                    (
                        "floor-max-epsilon",
                        f"dp-max-epsilon = {cfg.dp_max_epsilon} exceeds this site's maximum ε = {self.max_epsilon}",
                    )
                )
        local = cfg.local_dp_noise_multiplier
        if local < self.min_local_dp_noise_multiplier:
            found.append(
                (
                    "floor-local-dp",
                    f"local-dp-noise-multiplier = {local} is below this site's floor of "
                    f"{self.min_local_dp_noise_multiplier}",
                )
            )
        if self.max_local_epsilon is not None:
            from fedslide.common.dp import planned_releases, site_epsilon

            planned = planned_releases(cfg)
            eps = site_epsilon(local, planned, cfg.dp_delta)
            if eps > self.max_local_epsilon:
                found.append(
                    (
                        "floor-local-epsilon",
                        f"{planned} site-side release(s) at local-dp-noise-multiplier = {local} spend ε = {eps:.3g} "
                        f"against the coordinator (δ = {cfg.dp_delta:g}), above this site's maximum of "
                        f"{self.max_local_epsilon}",
                    )
                )
        if self.cluster_noise_multiplier > 0:
            clip = cfg.cluster_clip_norm
            if clip is None or cfg.cluster_noise_std < self.cluster_noise_multiplier * clip:
                found.append(
                    (
                        "floor-cluster-noise",
                        f"this site requires cluster-clip-norm set and cluster-noise-std ≥ "
                        f"{self.cluster_noise_multiplier} × cluster-clip-norm (got clip {clip}, "
                        f"std {cfg.cluster_noise_std})",
                    )
                )
        return found

    def check(self, cfg: FederationConfig) -> None:
        """Raise SiteRefusal (the first violation's code; every reason in the message) when `cfg` goes below."""
        found = self.violations(cfg)
        if found:
            raise SiteRefusal(
                found[0][0], "run refused by this site's privacy floors: " + "; ".join(f"{c}: {m}" for c, m in found)
            )
