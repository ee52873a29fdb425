"""The coordinating site's run outputs: metrics.json, the global models with a hash manifest, plots, report.md."""

from __future__ import annotations

import hashlib
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from fedslide.common.federation import per_class
from fedslide.common.federation import phases as ph
from fedslide.common.federation.models import named_models
from fedslide.common.metrics import METRIC_NAMES
from fedslide.common.training.outputs import write_json
from fedslide.server import clinical_outputs
from fedslide.server.privacy import privacy_report
from fedslide.server.protocol import RunResult

METRICS_SCHEMA = "fedslide.federation.metrics/1"
MODEL_ROWS = ("teacher_high", "student_low", "baseline_low")
OVERALL_METHOD = (
    "mean over sites weighted by each site's test slides (predictions never leave the sites, "
    "so metrics are not computed on pooled predictions)"
)


def save_models(
    run_dir: Path, models: dict[str, ArrayRecord], named: dict[str, ArrayRecord]
) -> dict[str, dict[str, Any]]:
    """Write each global model as `models/<name>.npz` (one array per state-dict tensor, from `named`); return the
    manifest (sha256, parameters, and the bytes of its arrays as they travel in a message, from `models`)."""
    out = run_dir / "models"
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, dict[str, Any]] = {}
    for name, record in models.items():
        path = out / f"{name}.npz"
        np.savez(path, **{k: v.numpy() for k, v in named[name].items()})  # type: ignore[arg-type]  # numpy stubs: allow_pickle
        manifest[name] = {
            "file": f"models/{name}.npz",
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "parameters": int(sum(int(np.prod(v.shape)) for v in record.values())),
            "serialized_bytes": int(sum(len(v.data) for v in record.values())),
        }
    write_json(out / "manifest.json", manifest)
    return manifest


def site_metrics(replies: list[Message], names: dict[int, str]) -> dict[str, dict[str, float]]:
    """Per site: the flat metric record of its final evaluation."""
    out = {}
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        record = next(iter(reply.content.metric_records.values()))
        out[names.get(node, str(node))] = {k: float(v) for k, v in record.items()}  # type: ignore[arg-type]
    return out


def _weighted(per_site: dict[str, dict[str, float]], key: str, weight_key: str) -> float | None:
    num = den = 0.0
    for values in per_site.values():
        if key in values and math.isfinite(values[key]) and values.get(weight_key, 0) > 0:
            num += values[key] * values[weight_key]
            den += values[weight_key]
    return num / den if den else None


def model_table(
    per_site: dict[str, dict[str, float]],
    held_out: set[str] | frozenset[str] = frozenset(),
    model_rows: tuple[str, ...] = MODEL_ROWS,
) -> dict[str, dict[str, Any]]:
    """models -> {overall (training sites' test splits), held_out (evaluation-only sites' slides), per_site}."""
    table: dict[str, dict[str, Any]] = {}
    parts = {
        "overall": {k: v for k, v in per_site.items() if k not in held_out},
        "held_out": {k: v for k, v in per_site.items() if k in held_out},
    }
    for model in model_rows:
        sites = {site: {m: v.get(f"{model}.{m}") for m in (*METRIC_NAMES, "loss", "n")} for site, v in per_site.items()}
        table[model] = {"per_site": sites}
        for part, values in parts.items():
            summary: dict[str, Any] = {m: _weighted(values, f"{model}.{m}", "n-test") for m in (*METRIC_NAMES, "loss")}
            summary["n"] = int(sum(v.get("n-test", 0) for v in values.values()))
            table[model][part] = summary
    return table


def cost(per_site: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Patches and model seconds per slide at high and low resolution (test slides, weighted over sites)."""
    out: dict[str, Any] = {
        res: {k: _weighted(per_site, f"cost.{res}.{k}", "n-test") for k in ("patches_per_slide", "seconds_per_slide")}
        for res in ("high", "low")
    }
    for key in ("patches_per_slide", "seconds_per_slide"):
        hi, lo = out["high"][key], out["low"][key]
        out[f"high_over_low_{key}"] = hi / lo if hi is not None and lo else None
    out["note"] = "seconds are MIL-model time from feature files at the sites (encoding excluded)"
    return out


def auc_resolution(sites: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per site: the scored slides per class (test split; all slides of an evaluation-only site) and, for two
    classes, the positive-negative pairs and the AUC step one pair makes (from the handshake's counts)."""
    out: dict[str, dict[str, Any]] = {}
    for site in sites:
        splits = ("train", "val", "test") if site["role"] == "eval-only" else ("test",)
        per_class, k = [], 0
        while f"n-test-class-{k}" in site:
            per_class.append(int(sum(site.get(f"n-{split}-class-{k}", 0) for split in splits)))
            k += 1
        pairs = per_class[0] * per_class[1] if len(per_class) == 2 else None
        out[site["name"]] = {"slides_per_class": per_class, "pairs": pairs, "auc_step": 1.0 / pairs if pairs else None}
    return out


def communication(result: RunResult, manifest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Bytes down/up per phase and the largest upload of a site in one round vs. the size of the models it carries."""
    grid = result.fed.grid
    largest: dict[str, int] = defaultdict(int)
    for upload in grid.uploads:
        largest[upload["phase"]] = max(largest[upload["phase"]], int(upload["bytes"]))
    phase_models = {
        "adapter": ("adapter",),
        "teacher": ("teacher", "baseline"),
        "experts": ("experts",),
        "student": ("student",),
    }  # the models a phase's messages carry
    per_phase = {}
    for phase, counts in grid.bytes.items():
        entry: dict[str, Any] = dict(counts)
        entry["max_upload_per_site_round"] = largest.get(phase, 0)
        models = phase_models.get(phase, ())
        if models and all(m in manifest for m in models):
            size = sum(manifest[m]["serialized_bytes"] for m in models)
            entry["model_bytes"] = size
            entry["max_upload_over_model"] = largest.get(phase, 0) / size if size else None
        per_phase[phase] = entry
    total = {"down": sum(c["down"] for c in grid.bytes.values()), "up": sum(c["up"] for c in grid.bytes.values())}
    return {"per_phase": per_phase, "total": total}


def build_metrics(result: RunResult, manifest: dict[str, dict[str, Any]], seconds: float) -> dict[str, Any]:
    """The run's metrics.json document."""
    fed = result.fed
    names = {n: s.name for n, s in [*fed.sites.items(), *fed.eval_sites.items()]}
    per_site = site_metrics(result.evaluation, names)
    models = model_table(per_site, {s.name for s in fed.eval_sites.values()})
    if fed.facts and len(fed.facts.classes) > 2:  # per class, by the federation's class names
        held_out = {s.name for s in fed.eval_sites.values()}
        for model, table in per_class.model_tables(per_site, held_out, fed.facts.classes, MODEL_ROWS).items():
            models[model]["per_class"] = table
    row_names: tuple[str, ...] = MODEL_ROWS
    if clinical_outputs.has_bd_rows(per_site):  # the BD model, with / without the clinical data as recorded
        held_out = {s.name for s in fed.eval_sites.values()}  # every site: the held-out rows are the eval-only sites'
        models.update(model_table(per_site, held_out, ph.BD_EVALUATED))
        models[ph.BD_EVALUATED[0]]["with_clinical"] = clinical_outputs.with_clinical(per_site)
        if fed.facts and len(fed.facts.classes) > 2:  # per class, as for the other models
            for model, table in per_class.model_tables(per_site, held_out, fed.facts.classes, ph.BD_EVALUATED).items():
                models[model]["per_class"] = table
        row_names = (*MODEL_ROWS, *ph.BD_EVALUATED)
    train_sites = {s.name for s in fed.sites.values()}
    per_site = {k: v for k, v in per_site.items() if k in train_sites}  # cost: the training sites' test slides
    rows = [{"model": m, **{k: models[m]["overall"].get(k) for k in (*METRIC_NAMES, "loss", "n")}} for m in row_names]
    sites = [{"node": n, "name": s.name, "role": "train", **s.counts} for n, s in sorted(fed.sites.items())] + [
        {"node": n, "name": s.name, "role": "eval-only", **s.counts} for n, s in sorted(fed.eval_sites.items())
    ]
    return {
        "schema": METRICS_SCHEMA,
        "run_id": fed.run_id,
        "mode": fed.cfg.mode,
        "classes": list(fed.facts.classes) if fed.facts else [],
        "encoder": fed.facts.encoder_name if fed.facts else None,
        "sites": sites,
        "refused": fed.refused,
        "rows": rows,
        "auc_resolution": auc_resolution(sites),
        "models": models,
        "overall_method": OVERALL_METHOD,
        "cost": cost(per_site),
        "communication": communication(result, manifest),
        "missing": fed.grid.missing,
        "rejections": [vars(r) for r in fed.validator.rejections],
        "round_errors": [vars(r) for r in fed.validator.round_errors],
        "status": "error" if fed.validator.round_errors else "ok",
        "learning_curves": fed.curves,
        "clusters": fed.ckpt.phase_done("clusters"),
        "privacy": privacy_report(fed.cfg, fed.accountant),
        "timings": {**fed.timings, "total": round(seconds, 3)},
        "models_manifest": manifest,
        "config": fed.cfg.to_toml_dict(),
    }


def _fmt(value: Any) -> str:
    return (
        "n/a"
        if value is None or (isinstance(value, float) and not math.isfinite(value))
        else (f"{value:.3f}" if isinstance(value, float) else str(value))
    )


def plot_learning_curves(metrics: dict[str, Any], path: Path) -> Path | None:
    """Validation loss per round of each weights phase (the teacher phase: teacher and baseline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = metrics["learning_curves"]
    if not curves:
        return None
    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 2.8), squeeze=False)
    for ax, (phase, history) in zip(axes[0], curves.items()):
        keys = sorted({k for h in history for k in h if k.startswith("val_loss")})
        for key in keys:
            pts = [(h["round"], h[key]) for h in history if key in h]
            ax.plot(
                [r for r, _ in pts],
                [v for _, v in pts],
                marker="o",
                ms=3,
                label=key.replace("val_loss", "val") or "val",
            )
        pts = [(h["round"], h["train_loss"]) for h in history if "train_loss" in h]
        if pts:
            ax.plot(
                [r + 1 for r, _ in pts],
                [v for _, v in pts],
                ls="--",
                label="train" if "val_loss" in keys else f"train_{phase}",
            )
        ax.set_title(phase)
        ax.set_xlabel("round")
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_site_bars(metrics: dict[str, Any], path: Path, metric: str = "auc") -> Path:
    """Per-site test `metric` of teacher (high), student and baseline (low)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sites = [s["name"] for s in metrics["sites"]]
    fig, ax = plt.subplots(figsize=(1.6 + 1.4 * len(sites), 3.0))
    width = 0.8 / len(MODEL_ROWS)
    for i, model in enumerate(MODEL_ROWS):
        values = [metrics["models"][model]["per_site"].get(s, {}).get(metric) for s in sites]
        ax.bar(np.arange(len(sites)) + i * width, [v if v is not None else 0 for v in values], width, label=model)
    ax.set_xticks(np.arange(len(sites)) + width * (len(MODEL_ROWS) - 1) / 2, sites)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"test {metric}")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """report.md: the metric table, per-site results, cost, communication, what was refused or missing."""
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    curves = plot_learning_curves(metrics, plots / "learning_curves.png")
    bars = plot_site_bars(metrics, plots / "site_auc.png")
    lines = [
        f"# fedslide federated run `{metrics['run_id']}`",
        "",
        *(
            [f"**Status: error** — {len(metrics['round_errors'])} round(s) released no model (see Errors).", ""]
            if metrics.get("round_errors")
            else []
        ),
        f"Mode: {metrics['mode']}; classes: {', '.join(metrics['classes'])}; encoder: {metrics['encoder']}; "
        f"sites: {', '.join(s['name'] for s in metrics['sites'])}.",
        "",
        "## Test metrics (overall = " + metrics["overall_method"] + ")",
        "",
        "| model | " + " | ".join(METRIC_NAMES) + " | n |",
        "|---" * (len(METRIC_NAMES) + 2) + "|",
    ]
    for row in metrics["rows"]:
        lines.append(f"| {row['model']} | " + " | ".join(_fmt(row[k]) for k in METRIC_NAMES) + f" | {row['n']} |")
    steps = {name: r for name, r in metrics.get("auc_resolution", {}).items() if r["pairs"]}
    if steps:
        lines += [
            "",
            "How fine these AUCs are: "
            + "; ".join(
                f"{name} {' × '.join(map(str, r['slides_per_class']))} slides per class, {r['pairs']} pair(s): "
                f"its AUC moves in steps of {r['auc_step']:.3f}"
                for name, r in steps.items()
            )
            + ". A difference smaller than a site's step is one pair of slides (one per class) there, not evidence.",
        ]
    lines += [
        "",
        "## Per site (test AUC)",
        "",
        "| site | " + " | ".join(MODEL_ROWS) + " |",
        "|---" * (len(MODEL_ROWS) + 1) + "|",
    ]
    for site in metrics["sites"]:
        name = site["name"]
        lines.append(
            f"| {name} | "
            + " | ".join(_fmt(metrics["models"][m]["per_site"].get(name, {}).get("auc")) for m in MODEL_ROWS)
            + " |"
        )
    lines += ["", f"![per-site AUC](plots/{bars.name})", ""]
    lines += per_class.report_lines(metrics["models"])
    c = metrics["cost"]
    lines += [
        "## Cost per test slide",
        "",
        f"- patches: high {_fmt(c['high']['patches_per_slide'])}, low {_fmt(c['low']['patches_per_slide'])} "
        f"({_fmt(c['high_over_low_patches_per_slide'])}× fewer at low resolution)",
        f"- model seconds: high {_fmt(c['high']['seconds_per_slide'])}, low {_fmt(c['low']['seconds_per_slide'])} "
        f"({c['note']})",
        "",
        "## Communication",
        "",
        "| phase | down bytes | up bytes | max upload / site / round | ÷ model size |",
        "|---|---|---|---|---|",
    ]
    for phase, entry in metrics["communication"]["per_phase"].items():
        lines.append(
            f"| {phase} | {entry['down']:,} | {entry['up']:,} | {entry['max_upload_per_site_round']:,} | "
            f"{_fmt(entry.get('max_upload_over_model'))} |"
        )
    if curves is not None:
        lines += ["", "## Learning curves", "", f"![learning curves](plots/{curves.name})"]
    privacy = metrics["privacy"]
    lines += ["", "## Privacy", ""]
    if privacy["enabled"]:
        lines += [
            f"- differential privacy: ε = {privacy['epsilon']:.3g} at δ = {privacy['delta']:g} after "
            f"{privacy['releases']} noised releases (noise multiplier {privacy['noise_multiplier']}, clipping norm "
            f"{privacy['clipping_norm']}; {privacy['accounting']})",
            f"- {privacy['trust_model']}",
        ]
    else:
        lines.append("- server-side differential privacy: off (dp-noise-multiplier = 0)")
    site_dp = privacy.get("against_coordinator", {})
    if site_dp.get("enabled"):
        lines += [
            f"- site-side differential privacy: ε = {site_dp['epsilon']:.3g} at δ = {site_dp['delta']:g} against the "
            f"coordinator after at most {site_dp['releases_per_site']} updates per site (noise multiplier "
            f"{site_dp['noise_multiplier']}, clipping norm {site_dp['clipping_norm']})",
            f"- {site_dp['trust_model']}",
        ]
    else:
        lines.append("- against the coordinator: no ε (local-dp-noise-multiplier = 0): it sees every exact update")
    third = privacy.get("against_third_parties", {})
    if third.get("epsilon") is not None:
        lines.append(
            f"- against third parties (the released global models): ε = {third['epsilon']:.3g} at "
            f"δ = {third['delta']:g} ({' and '.join(third['by'])})"
        )
    if privacy.get("not_covered"):
        lines.append(f"- {privacy['not_covered']}")
    lines.append(
        f"- cluster sums noise std: {privacy['cluster_noise_std']}; small clusters withheld below "
        f"{metrics['config'].get('suppress-below') or metrics['config']['clusters']['suppress-below']} slides"
    )
    errors = metrics.get("round_errors", [])
    if errors:
        lines += ["", "## Errors: rounds that released no model", ""]
        lines += [f"- phase {e['phase']} round {e['round']}: {e['reason']}" for e in errors]
    lines += ["", "## Sites refused, absent rounds, rejected updates", ""]
    lines += [f"- refused: {r}" for r in metrics["refused"]] or ["- no site refused"]
    lines += [f"- absent: phase {m['phase']} round {m['round']}: nodes {m['nodes']}" for m in metrics["missing"]] or [
        "- no absences"
    ]
    lines += [
        f"- rejected: phase {r['phase']} round {r['round']} node {r['node']}: {r['reason']}"
        for r in metrics["rejections"]
    ] or ["- no update rejected"]
    lines += ["", "## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in metrics["timings"].items()), ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_outputs(result: RunResult, seconds: float) -> dict[str, Any]:
    """Models + manifest, metrics.json, plots and report.md under the run directory."""
    assert result.fed.facts is not None
    named = named_models(result.fed.cfg, result.fed.facts, result.models)
    manifest = save_models(result.run_dir, result.models, named)
    bd = clinical_outputs.save_bd_model(
        result.run_dir, result.fed.cfg, result.fed.facts, result.clinical, result.fed.clinical_norm
    )
    if bd:
        manifest.update(bd)
        write_json(result.run_dir / "models" / "manifest.json", manifest)
    metrics = build_metrics(result, manifest, seconds)
    write_json(result.run_dir / "metrics.json", metrics)
    write_report(result.run_dir, metrics)
    (result.run_dir / "config.json").write_text(json.dumps(result.fed.cfg.to_toml_dict(), indent=2))
    return metrics
