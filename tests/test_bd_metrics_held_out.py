"""metrics.json's BD rows (`bd_clinical` / `bd_no_clinical`) include the evaluation-only sites: their held-out
summary, per-site rows, per-class held-out table and `with_clinical` count (hand-made site metrics)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import pytest

from fedslide.common.federation import phases as ph
from fedslide.common.federation.per_class import confusion_metric
from fedslide.server import outputs
from fedslide.server.protocol import RunResult

CLASSES = ("a", "b", "c")


def _site(auc: float, n: int, with_clinical: int) -> dict[str, float]:
    values: dict[str, float] = {"n-test": float(n), ph.BD_WITH_CLINICAL: float(with_clinical)}
    for model in ph.BD_EVALUATED:
        values |= {f"{model}.auc": auc, f"{model}.n": float(n)}
        for i in range(len(CLASSES)):  # all of a site's slides predicted correctly
            for j in range(len(CLASSES)):
                values[confusion_metric(model, i, j)] = float(n // len(CLASSES) if i == j else 0)
    return values


def _result() -> RunResult:
    site = SimpleNamespace
    fed = SimpleNamespace(
        sites={1: site(name="site1", counts={}), 2: site(name="site2", counts={})},
        eval_sites={3: site(name="site3", counts={})},
        facts=SimpleNamespace(classes=CLASSES, encoder_name="enc"),
        cfg=SimpleNamespace(mode="full", to_toml_dict=dict),
        run_id="loso",
        refused=[],
        grid=SimpleNamespace(uploads=[], bytes={}, missing=[]),
        validator=SimpleNamespace(rejections=[], round_errors=[]),
        curves={},
        ckpt=SimpleNamespace(phase_done=lambda phase: False),
        accountant=None,
        timings={},
    )
    return cast(RunResult, SimpleNamespace(evaluation=[], fed=fed))


def test_the_bd_rows_include_the_evaluation_only_site(monkeypatch: pytest.MonkeyPatch) -> None:
    per_site = {"site1": _site(0.8, 6, 3), "site2": _site(0.6, 6, 0), "site3": _site(0.9, 9, 4)}
    monkeypatch.setattr(outputs, "site_metrics", lambda replies, names: per_site)
    monkeypatch.setattr(outputs, "privacy_report", lambda cfg, accountant: {})
    metrics: dict[str, Any] = outputs.build_metrics(_result(), {}, 1.0)
    for model in ph.BD_EVALUATED:
        table = metrics["models"][model]
        assert table["held_out"]["n"] == 9 and table["held_out"]["auc"] == pytest.approx(0.9)
        assert table["overall"]["n"] == 12 and table["overall"]["auc"] == pytest.approx(0.7)
        assert set(table["per_site"]) == {"site1", "site2", "site3"} and table["per_site"]["site3"]["auc"] == 0.9
        assert table["per_class"]["held_out"]["sites"] == ["site3"]
        assert table["per_class"]["held_out"]["confusion_matrix"] == [[3, 0, 0], [0, 3, 0], [0, 0, 3]]
        assert table["per_class"]["overall"]["sites"] == ["site1", "site2"]
    assert metrics["models"]["bd_clinical"]["with_clinical"] == {"site1": 3, "site2": 0, "site3": 4}
    assert [r["n"] for r in metrics["rows"] if r["model"] in ph.BD_EVALUATED] == [12, 12]
