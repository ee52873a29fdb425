"""The seed offsets of every random stage, in one table: a stage's seed is the run's seed plus its offset.

The centralised pipeline (`common.distillation.pipeline`), the server's initial models (`server.protocol`,
`server.logits_mode`) and the sites' local rounds (`client.local_phases`, where the offset is one entry of
the round's seed sequence) all read it, so that the same stage draws the same numbers everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SeedOffsets:
    """Offset of each stage's seed from the run's seed."""

    adapter: int = 1  # the cross-resolution adapter: its initial weights and its training
    teacher: int = 2  # the high-res teacher: its initial weights and its training
    clusters: int = 3  # the centralised balanced k-means
    experts_init: int = 3  # federated experts started from scratch (experts.init = "scratch")
    baseline_rounds: int = 4  # a site's local rounds of the low-res baseline
    student_rounds: int = 5  # a site's local rounds of the student (weights mode)
    experts: int = 10  # expert c trains with offset experts + c
    proxy_teacher: int = 20  # a site's fine-tuning of the teacher before its logits on the proxy cohort
    proxy_experts: int = 30  # ... of expert c (proxy_experts + c)
    pixel_stage1: int = 40  # a site's local rounds of federated pixel stage 1 (shuffling, stain jitter)
    student: int = 100  # students' and the low-res baseline's initial weights and training (the same for all)


SEED_OFFSETS = SeedOffsets()
