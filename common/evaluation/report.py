"""`fedslide report RUN_DIR`: report.md and a self-contained report.html (figures as base64 data URIs).

For an evaluation study (metrics.json schema `fedslide.evaluation.metrics/1`): the cohort table,
metric tables with bootstrap CIs, the in-distribution vs out-of-site gap, paired tests, ROC curves
per site, calibration, per-site bars, the site-local transfer matrix, learning curves per phase
and round, communication bytes per phase, compute cost (high vs low) and a grid of attention
heatmaps (tumor and normal examples per site, with the ground-truth tumor outline where the
cohort has masks). For a single federated run (`fedslide.federation.metrics/1`) the same report
without CIs, ROC, calibration and heatmaps (those need per-slide predictions, which stay at the
sites). report.md links its figures from `report_files/`; report.html needs no other file.
"""

from __future__ import annotations

import base64
import html
import json
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedslide.common.evaluation import multiclass_plots, plots
from fedslide.common.evaluation.clinical_column import clinical_table
from fedslide.common.evaluation.predictions import PredictionTable
from fedslide.common.evaluation.schema import METRICS_SCHEMA
from fedslide.common.metrics import METRIC_NAMES

FEDERATION_SCHEMA = "fedslide.federation.metrics/1"
ASSETS = "report_files"
CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}
h1{border-bottom:2px solid #444}h2{border-bottom:1px solid #ccc;margin-top:2em}
table{border-collapse:collapse;margin:0.8em 0;font-size:0.85em;display:block;overflow-x:auto}th,td{border:1px solid #ccc;padding:3px 7px;
text-align:right;white-space:nowrap}th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:0.85em;color:#555}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(360px,1fr));gap:12px}
.grid figure{margin:0}.missing{padding:2em;background:#fafafa;border:1px dashed #bbb;color:#777}
.note{font-size:0.85em;color:#555}code{background:#f4f4f4;padding:0 3px}
"""


class ReportError(ValueError):
    """The run folder holds no metrics.json the report understands."""


# ---- a small document model rendered to both Markdown and HTML --------------------------------------
@dataclass
class Image:
    """A PNG (or why there is none) with its caption."""

    name: str
    png: bytes | None
    caption: str
    missing: str = ""


@dataclass
class Doc:
    """Blocks: ("h", level, text) | ("p", text) | ("table", header, rows) | ("figure", Image) | ("grid", title, [Image])."""

    title: str
    blocks: list[tuple[Any, ...]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str, note: bool = False) -> None:
        self.blocks.append(("p", text, note))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.blocks.append(("table", list(header), [[str(c) for c in r] for r in rows]))

    def figure(self, name: str, png: bytes | None, caption: str) -> None:
        if png is not None:
            self.blocks.append(("figure", Image(name, png, caption)))

    def grid(self, title: str, images: list[Image]) -> None:
        self.blocks.append(("grid", title, images))

    def images(self) -> list[Image]:
        out = []
        for block in self.blocks:
            if block[0] == "figure":
                out.append(block[1])
            elif block[0] == "grid":
                out.extend(block[2])
        return out

    def markdown(self) -> str:
        lines = [f"# {self.title}", ""]
        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                lines += ["#" * block[1] + " " + block[2], ""]
            elif kind == "p":
                lines += [f"_{block[1]}_" if block[2] else block[1], ""]
            elif kind == "table":
                header, rows = block[1], block[2]
                esc = [[c.replace("|", "\\|") for c in r] for r in [header, *rows]]
                lines += ["| " + " | ".join(esc[0]) + " |", "|" + "---|" * len(header)]
                lines += ["| " + " | ".join(r) + " |" for r in esc[1:]] + [""]
            elif kind == "figure":
                img = block[1]
                lines += [f"![{img.caption}]({ASSETS}/{img.name})", "", f"_{img.caption}_", ""]
            elif kind == "grid":
                lines += [f"**{block[1]}**", ""]
                for img in block[2]:
                    if img.png is None:
                        lines.append(f"- {img.caption}: _{img.missing}_")
                    else:
                        lines.append(f"- {img.caption}  \n  ![{img.caption}]({ASSETS}/{img.name})")
                lines.append("")
        return "\n".join(lines)

    def html(self) -> str:
        e = html.escape
        parts = [
            "<!DOCTYPE html>",
            "<html lang='en'><head><meta charset='utf-8'>",
            f"<title>{e(self.title)}</title>",
            f"<style>{CSS}</style></head><body>",
            f"<h1>{e(self.title)}</h1>",
        ]

        def img_tag(img: Image) -> str:
            if img.png is None:
                return f"<figure><div class='missing'>{e(img.missing)}</div><figcaption>{e(img.caption)}</figcaption></figure>"
            data = base64.b64encode(img.png).decode("ascii")
            return (
                f"<figure><img alt='{e(img.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{e(img.caption)}</figcaption></figure>"
            )

        for block in self.blocks:
            kind = block[0]
            if kind == "h":
                parts.append(f"<h{block[1] + 1}>{e(block[2])}</h{block[1] + 1}>")
            elif kind == "p":
                parts.append(f"<p class='note'>{e(block[1])}</p>" if block[2] else f"<p>{e(block[1])}</p>")
            elif kind == "table":
                head = "".join(f"<th>{e(c)}</th>" for c in block[1])
                body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in block[2])
                parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "figure":
                parts.append(img_tag(block[1]))
            elif kind == "grid":
                parts.append(
                    f"<h4>{e(block[1])}</h4><div class='grid'>" + "".join(img_tag(i) for i in block[2]) + "</div>"
                )
        parts.append("</body></html>")
        return "\n".join(parts)


# ---- formatting ------------------------------------------------------------------------------------
def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(iv: dict[str, Any] | None) -> str:
    """`0.912 [0.850, 0.961]`."""
    if not iv or iv.get("estimate") is None:
        return "n/a"
    est = fmt(iv["estimate"])
    if iv.get("lo") is None or iv.get("hi") is None:
        return est
    return f"{est} [{fmt(iv['lo'])}, {fmt(iv['hi'])}]"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return str(n)


# ---- sections of an evaluation report ---------------------------------------------------------------
def _ordered_models(metrics: dict[str, Any]) -> list[str]:
    order = [
        f"{r}.{k}"
        for r in ("local", "federated", "centralized")
        for k in ("student_low", "teacher_high", "baseline_low")
    ]
    present = metrics.get("models", {})
    return [m for m in order if m in present] + [m for m in present if m not in order]


def _main(models: Sequence[str]) -> list[str]:
    main = [m for m in plots.MAIN_MODELS if m in models]
    return main or list(models)[:4]


def site_names(metrics: dict[str, Any]) -> list[str]:
    """The run's site names in the report's one stable order (sorted by name)."""
    return sorted(s["name"] for s in metrics["sites"])


def sorted_sites(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's site entries sorted by name."""
    return sorted(metrics["sites"], key=lambda s: s["name"])


def cohort_section(doc: Doc, metrics: dict[str, Any]) -> None:
    classes = metrics["classes"]
    doc.h(2, "Cohort")
    rows = []
    for s in sorted_sites(metrics):
        balance = ", ".join(f"{c} {s['classes'].get(c, 0)}" for c in classes)
        splits = "/".join(str(s["splits"].get(k, 0)) for k in ("train", "val", "test"))
        mag = ", ".join(f"{m:g}×" for m in s["magnification"]) or "n/a"
        mpp = ", ".join(f"{m:g}" for m in s["mpp"]) or "n/a"
        rows.append(
            [
                s["name"],
                s["slides"],
                s["patients"],
                splits,
                balance,
                mag,
                mpp,
                s.get("scanner") or "n/a",
                s["masks"] or "none",
                s["held_out_slides"],
            ]
        )
    doc.table(
        [
            "site",
            "slides",
            "patients",
            "train/val/test",
            "class balance",
            "scanner magnification",
            "µm/px",
            "scanner",
            "tumor masks",
            "slides scored when held out",
        ],
        rows,
    )


def _mean_auc(metrics: dict[str, Any], model: str, setting: str) -> float | None:
    return metrics["models"][model][setting]["mean_over_sites"].get("auc")


def _gap_sentence(metrics: dict[str, Any]) -> str:
    models = metrics["models"]
    parts = []
    for model in ("local.student_low", "federated.student_low", "centralized.student_low", "federated.teacher_high"):
        if model not in models:
            continue
        ins, out = _mean_auc(metrics, model, "in_distribution"), _mean_auc(metrics, model, "out_of_site")
        if ins is not None and out is not None:
            parts.append(
                f"{plots.label(model)}: AUC {ins:.3f} in-distribution vs {out:.3f} out-of-site (gap {ins - out:+.3f})"
            )
    text = (
        "Mean of the per-site AUCs — " + "; ".join(parts) + "."
        if parts
        else "No gap could be computed (a setting has no scored slides)."
    )
    if "local.student_low" in models and "federated.student_low" in models:
        loc = _mean_auc(metrics, "local.student_low", "out_of_site")
        fed = _mean_auc(metrics, "federated.student_low", "out_of_site")
        if loc is not None and fed is not None:
            verdict = "higher" if fed > loc else "not higher"
            text += (
                f" At sites they never saw, the federated student's AUC ({fed:.3f}) is {verdict} than the "
                f"site-local students' ({loc:.3f})."
            )
    return text


def metric_tables(doc: Doc, metrics: dict[str, Any], models: Sequence[str]) -> None:
    sites = site_names(metrics)
    ci = round(100 * (1 - metrics["bootstrap"]["alpha"]))
    for setting, title in plots.SETTING_TITLES.items():
        doc.h(3, f"Pooled over sites: {title}")
        doc.p(
            f"Slides: {metrics['settings'][setting]['slides']}; models: {metrics['settings'][setting]['models']}. "
            f"Estimate [{ci} % bootstrap CI].",
            note=True,
        )
        rows = []
        for m in models:
            entry = metrics["models"][m][setting]["overall"]
            if entry is None:
                continue
            rows.append(
                [
                    plots.label(m),
                    *(fmt_ci(entry[k]) for k in METRIC_NAMES),
                    entry["n"],
                    entry["n_slides"],
                    entry["bootstrap"],
                ]
            )
        doc.table(["model", *METRIC_NAMES, "scored rows", "slides", "bootstrap"], rows)
        rows = []
        for m in models:
            per_site = metrics["models"][m][setting]["per_site"]
            mean = metrics["models"][m][setting]["mean_over_sites"].get("auc")
            rows.append([plots.label(m), *(fmt_ci((per_site.get(s) or {}).get("auc")) for s in sites), fmt(mean)])
        doc.p(f"AUC per site, {title}:")
        doc.table(["model", *sites, "mean over sites"], rows)


def gap_table(doc: Doc, metrics: dict[str, Any], models: Sequence[str]) -> None:
    sites = site_names(metrics)
    rows = []
    for m in models:
        sec = metrics["models"][m]
        ins = (sec["in_distribution"]["overall"] or {}).get("auc")
        out = (sec["out_of_site"]["overall"] or {}).get("auc")
        rows.append(
            [
                plots.label(m),
                fmt_ci(ins),
                fmt_ci(out),
                fmt(sec["gap"]["overall"]["auc"]),
                fmt(sec["gap"]["mean_over_sites"]["auc"]),
                *(fmt(sec["gap"]["per_site"][s]["auc"]) for s in sites),
            ]
        )
    doc.table(
        [
            "model",
            "AUC in-distribution (pooled)",
            "AUC out-of-site (pooled)",
            "gap (pooled)",
            "gap (mean over sites)",
            *(f"gap at {s}" for s in sites),
        ],
        rows,
    )
    doc.p(
        "Pooled: all scored slides together; a slide scored by several fold models (in-distribution slides of the "
        "LOSO runs, held-out slides of site-local models) counts once per model, so pooled AUCs also reflect how "
        "differently those models are calibrated. The mean over sites avoids that cross-model pooling.",
        note=True,
    )


def paired_section(doc: Doc, metrics: dict[str, Any]) -> None:
    tests = metrics.get("paired_tests", [])
    if not tests:
        return
    doc.h(2, "Paired AUC tests")
    doc.p(
        "diff = AUC(A) − AUC(B) on the same slides scored by the same fold's models; DeLong on independent slides, "
        "paired (patient-cluster) bootstrap otherwise.",
        note=True,
    )
    rows = []
    for t in tests:
        if "skipped" in t:
            rows.append(
                [plots.label(t["a"]), plots.label(t["b"]), t["setting"], t["site"], "", "", "", "", t["skipped"]]
            )
        else:
            rows.append(
                [
                    plots.label(t["a"]),
                    plots.label(t["b"]),
                    t["setting"],
                    t["site"],
                    fmt(t["auc_a"]),
                    fmt(t["auc_b"]),
                    f"{fmt(t['diff'])} [{fmt(t['lo'])}, {fmt(t['hi'])}]",
                    fmt(t["p_value"], 4),
                    f"{t['method']}, n = {t['n']}",
                ]
            )
    doc.table(["A", "B", "setting", "site", "AUC A", "AUC B", "diff [CI]", "p", "method"], rows)


def federation_sections(doc: Doc, federation: dict[str, Any], cost: dict[str, Any]) -> None:
    if federation:
        doc.h(2, "Federated training")
        doc.figure(
            "learning_curves.png",
            plots.learning_curves_figure(federation),
            "Validation loss per round of each federated phase (one line per LOSO federation).",
        )
        per_phase: dict[str, dict[str, float]] = {}
        for fold in federation.values():
            for phase, entry in fold.get("communication", {}).get("per_phase", {}).items():
                acc = per_phase.setdefault(phase, {"down": 0.0, "up": 0.0, "max_upload_per_site_round": 0.0, "n": 0})
                acc["down"] += entry.get("down", 0)
                acc["up"] += entry.get("up", 0)
                acc["max_upload_per_site_round"] = max(
                    acc["max_upload_per_site_round"], entry.get("max_upload_per_site_round", 0)
                )
                acc["n"] += 1
        mean = {
            p: {"down": v["down"] / v["n"], "up": v["up"] / v["n"], "max": v["max_upload_per_site_round"]}
            for p, v in per_phase.items()
        }
        doc.h(3, "Communication per phase")
        doc.table(
            [
                "phase",
                "down (mean per federation)",
                "up (mean per federation)",
                "largest upload of a site in one round",
            ],
            [[p, fmt_bytes(v["down"]), fmt_bytes(v["up"]), fmt_bytes(v["max"])] for p, v in mean.items()],
        )
        doc.figure(
            "communication.png", plots.communication_figure(mean), "Bytes per phase, mean over the LOSO federations."
        )
        privacy = [
            f"{h}: ε = {fmt(f['privacy'].get('epsilon'))}"
            for h, f in federation.items()
            if (f.get("privacy") or {}).get("enabled")
        ]
        doc.p(
            "Differential privacy: " + ("; ".join(privacy) if privacy else "off in every federation") + ".", note=True
        )
    if cost:
        doc.h(2, "Compute cost: high vs low resolution")
        end_to_end_section(doc, cost.get("end_to_end"))
        rows = []
        for name in ("measured", "federated"):
            if name in cost:
                c = cost[name]
                what = (
                    f"{c.get('models', 'bundles')} models, scored here"
                    if name == "measured"
                    else f"as the sites measured it ({c.get('folds')} federations)"
                )
                for key in ("patches_per_slide", "seconds_per_slide"):
                    rows.append(
                        [
                            what,
                            "patches" if key == "patches_per_slide" else "MIL-model seconds (no encoding)",
                            fmt(c["high"].get(key), 4),
                            fmt(c["low"].get(key), 4),
                            fmt(c["high_over_low"].get(key), 2),
                        ]
                    )
        doc.p("MIL models alone, on feature files (patch reading and encoding excluded):")
        doc.table(["source", "per slide", "high-res (teacher)", "low-res (student)", "high ÷ low"], rows)
        doc.p(cost.get("note", ""), note=True)
        doc.figure("cost.png", plots.cost_figure(cost), "Patches and model seconds per slide, high vs low resolution.")


END_TO_END_ROWS = (
    ("patches_per_slide", "patches encoded"),
    ("seconds_per_slide", "seconds, end to end from the file"),
    ("read_encode_seconds_per_slide", "of which patch reading + encoding"),
)


def end_to_end_section(doc: Doc, e2e: dict[str, Any] | None) -> None:
    """End-to-end seconds per slide from the slide file, encoding included, next to the patch counts (or why
    they were not measured)."""
    if not e2e:
        return
    if "skipped" in e2e:
        doc.p(f"End-to-end seconds per slide (from the slide file) not measured: {e2e['skipped']}", note=True)
        return
    where = f" of {e2e['site']}" if e2e.get("site") else ""
    doc.p(f"Per slide, end to end from the slide file, encoding included ({e2e['slides']} held-out slide(s){where}):")
    rows = [
        [label, fmt(e2e["high"].get(key), 3), fmt(e2e["low"].get(key), 3), fmt(e2e["high_over_low"].get(key), 2)]
        for key, label in END_TO_END_ROWS
    ]
    doc.table(["per slide (end to end)", "high-res (teacher)", "low-res (student)", "high ÷ low"], rows)
    doc.p(e2e.get("note", ""), note=True)


def _heatmap_png(run_dir: Path, entry: dict[str, Any]) -> tuple[bytes | None, str]:
    path = Path(entry["path"])
    path = path if path.is_absolute() else run_dir / path
    if not path.is_file():
        return None, f"heatmap file missing: {path}"
    return path.read_bytes(), ""


def heatmap_section(doc: Doc, run_dir: Path, metrics: dict[str, Any]) -> None:
    entries = metrics.get("heatmaps", [])
    doc.h(2, "Attention heatmaps")
    if not entries:
        doc.p("No heatmaps in this study (heatmaps.enabled = false, or no model to draw them with).", note=True)
        return
    doc.p(
        "Student attention over the slide thumbnail, one cell per student instance (the colour bar: attention × "
        "instances, 1 = uniform); magenta: ground-truth lesion outline (its class in the legend) where the cohort has masks. Heatmaps of the "
        "federated student were rendered by each site into its own run folder (in a federation they never leave "
        "the site; this study reads them from the sites' folders); the others are of the centralized reference.",
        note=True,
    )
    for site in sorted({e["site"] for e in entries}):
        images = []
        for i, e in enumerate(x for x in entries if x["site"] == site):
            png, missing = _heatmap_png(run_dir, e)
            caption = f"{e['label']} slide {e['slide_id']} ({e['split']}) — {e['caption']}; predicted {e['predicted']}"
            images.append(Image(f"heatmap_{site}_{i}.png", png, caption, missing))
        doc.grid(f"{site}", images)


def evaluation_doc(run_dir: Path, metrics: dict[str, Any]) -> Doc:
    """The report of an evaluation study."""
    models = _ordered_models(metrics)
    main = _main(models)
    sites = site_names(metrics)
    doc = Doc(f"fedslide evaluation — study {metrics['study_id']}")
    b = metrics["bootstrap"]
    doc.p(
        f"Leave-one-site-out study over {len(sites)} sites ({', '.join(sites)}); classes: {', '.join(metrics['classes'])}; "
        f"encoder: {metrics.get('encoder')}; regimes: {', '.join(metrics['regimes'])}. Confidence intervals: "
        f"{b['n_boot']} bootstrap resamples over slides (grouped by patient where patients have several slides "
        f"or a slide is scored by several fold models), {round(100 * (1 - b['alpha']))} %."
    )
    doc.p(
        "Study setting: this report pools per-slide predictions that, in a federation, stay at each site "
        "(<site>/runs/<run-id>/predictions.csv); it was made where all the sites' folders are available.",
        note=True,
    )
    doc.h(2, "Generalisation to unseen sites")
    doc.p(_gap_sentence(metrics))
    gap_table(doc, metrics, models)
    doc.figure(
        "gap.png", plots.gap_figure(metrics["models"], models), "AUC in-distribution vs out-of-site, pooled, 95 % CI."
    )
    cohort_section(doc, metrics)
    doc.h(2, "Metrics with confidence intervals")
    metric_tables(doc, metrics, models)
    doc.figure(
        "site_auc.png",
        plots.site_bars_figure(metrics["models"], main, sites),
        "AUC per site with 95 % CI whiskers, both settings.",
    )
    paired_section(doc, metrics)
    table = _predictions(run_dir, metrics)
    if table is not None:
        doc.h(2, "ROC curves and calibration")
        for setting, title in plots.SETTING_TITLES.items():
            doc.figure(
                f"roc_{setting}.png",
                plots.roc_figure(table, setting, main, sites, metrics["models"]),
                f"ROC curves per site and pooled, {title}.",
            )
        doc.figure(
            "calibration.png",
            plots.calibration_figure(table, main, metrics["models"]),
            "Reliability diagrams (pooled over sites); marker area grows with the number of slides in the bin.",
        )
        if len(table.classes) > 2:  # subtyping: confusion matrices, per-class ROC and per-class metrics
            doc.h(2, "Per-class results")
            for fig in multiclass_plots.multiclass_figures(table, main):
                doc.figure(fig.name, fig.png, fig.caption)
            class_rows = multiclass_plots.per_class_rows(table, "out_of_site", main)
            doc.table(multiclass_plots.PER_CLASS_HEADER, [[fmt(v) for v in r] for r in class_rows])
    else:
        doc.p(f"{metrics.get('predictions')} not found next to metrics.json: no ROC or calibration plots.", note=True)
    for key, transfer in metrics.get("transfer", {}).items():
        if key == "local.student_low" or len(metrics["transfer"]) == 1:
            doc.figure(
                "transfer.png",
                plots.transfer_figure(
                    _sorted_transfer(transfer), f"{plots.label(key)}: AUC by training and evaluation site"
                ),
                "Site-local models: diagonal = own test split, off-diagonal = another site's slides.",
            )
    federation_sections(doc, metrics.get("federation", {}), metrics.get("cost", {}))
    heatmap_section(doc, run_dir, metrics)
    clinical_header, clinical_rows = clinical_table(metrics.get("folds", {}))
    if clinical_rows:  # folds whose federation trained a BD model on a cohort with clinical data
        doc.h(2, "Clinical missingness (held-out site, federated BD model)")
        doc.table(clinical_header, clinical_rows)
    doc.h(2, "Runs and timings")
    rows = [
        [h, *(info.get(r, {}).get("run_dir", "") for r in ("local", "federated", "centralized"))]
        for h, info in sorted(metrics.get("folds", {}).items())
    ]
    doc.table(["site", "site-local run", "federation without it", "centralized without it"], rows)
    doc.p("Timings (s): " + ", ".join(f"{k} {v}" for k, v in metrics.get("timings", {}).items()), note=True)
    return doc


def _sorted_transfer(transfer: dict[str, Any]) -> dict[str, Any]:
    """The transfer matrix with its training and evaluation sites in name order."""
    values = transfer.get("values", {})
    ordered = {s: {t: values[s].get(t) for t in sorted(values)} for s in sorted(values)}
    return {**transfer, "values": ordered}


def _predictions(run_dir: Path, metrics: dict[str, Any]) -> PredictionTable | None:
    path = run_dir / str(metrics.get("predictions") or "predictions.csv")
    return PredictionTable.read(path) if path.is_file() else None


# ---- a single federated run ------------------------------------------------------------------------
def federation_doc(run_dir: Path, metrics: dict[str, Any]) -> Doc:
    """The report of one federated run (no per-slide predictions at the server: no CIs, ROC or heatmaps)."""
    doc = Doc(f"fedslide federated run {metrics['run_id']}")
    doc.p(
        f"Mode {metrics.get('mode')}; classes {', '.join(metrics.get('classes', []))}; encoder {metrics.get('encoder')}. "
        f"Overall = {metrics.get('overall_method', '')}. Per-slide predictions stay at the sites: for CIs, ROC "
        "curves, calibration and heatmaps run `fedslide evaluate` in a study setting."
    )
    doc.h(2, "Sites")
    doc.table(
        ["site", "role", *[k for k in ("n-train", "n-val", "n-test") if any(k in s for s in metrics["sites"])]],
        [
            [
                s["name"],
                s["role"],
                *(s.get(k, "") for k in ("n-train", "n-val", "n-test") if any(k in t for t in metrics["sites"])),
            ]
            for s in sorted_sites(metrics)
        ],
    )
    doc.h(2, "Test metrics")
    for part in ("overall", "held_out"):
        rows = [
            [m, *(fmt(v[part].get(k)) for k in METRIC_NAMES), v[part].get("n")]
            for m, v in metrics["models"].items()
            if v[part].get("n")
        ]
        if rows:
            doc.p(f"{part.replace('_', '-')} sites:")
            doc.table(["model", *METRIC_NAMES, "n"], rows)
    sites = site_names(metrics)
    rows = [[m, *(fmt(v["per_site"].get(s, {}).get("auc")) for s in sites)] for m, v in metrics["models"].items()]
    doc.p("AUC per site:")
    doc.table(["model", *sites], rows)
    fold = {
        "learning_curves": metrics.get("learning_curves", {}),
        "communication": metrics.get("communication", {}),
        "privacy": metrics.get("privacy", {}),
    }
    cost = dict(metrics.get("cost") or {})
    if cost.get("high"):
        cost = {
            "federated": {
                "folds": 1,
                "high": cost["high"],
                "low": cost["low"],
                "high_over_low": {
                    k: cost.get(f"high_over_low_{k}") for k in ("patches_per_slide", "seconds_per_slide")
                },
            },
            "note": cost.get("note", ""),
        }
    federation_sections(doc, {metrics["run_id"]: fold}, cost)
    run_heatmaps(doc, run_dir)
    return doc


def run_heatmaps(doc: Doc, run_dir: Path) -> None:
    """The heatmaps a run folder holds (`heatmaps/**/*.png`, by path), as one grid; nothing when it has none."""
    paths = sorted((run_dir / "heatmaps").glob("**/*.png")) if (run_dir / "heatmaps").is_dir() else []
    if not paths:
        return
    doc.h(2, "Attention heatmaps")
    images = [
        Image(f"run_heatmap_{i}.png", path.read_bytes(), str(path.relative_to(run_dir / "heatmaps").with_suffix("")))
        for i, path in enumerate(paths)
    ]
    doc.grid(f"{len(images)} heatmap(s) in {run_dir.name}/heatmaps", images)


# ---- entry point -----------------------------------------------------------------------------------
def load_metrics(run_dir: Path) -> dict[str, Any]:
    """metrics.json of a run folder (or the file itself), checked for a known schema."""
    path = run_dir / "metrics.json" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise ReportError(f"{path} does not exist: give a run folder written by fedslide evaluate or a federation")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from None
    schema = metrics.get("schema") if isinstance(metrics, dict) else None
    if schema not in (METRICS_SCHEMA, FEDERATION_SCHEMA):
        raise ReportError(
            f"{path}: schema {schema!r} is not one the report reads ({METRICS_SCHEMA}, {FEDERATION_SCHEMA})"
        )
    return metrics


def write_report(run_dir: Path | str, out_dir: Path | str | None = None) -> tuple[Path, Path]:
    """Write report.md (+ report_files/*.png) and report.html into `out_dir` (default: the study folder; for a
    federated run `<run>/report/`, beside the server's own report.md)."""
    run_dir = Path(run_dir)
    metrics = load_metrics(run_dir)
    if not run_dir.is_dir():
        run_dir = run_dir.parent
    doc = evaluation_doc(run_dir, metrics) if metrics["schema"] == METRICS_SCHEMA else federation_doc(run_dir, metrics)
    if out_dir is None:  # a federation's folder already has the server's report.md: do not overwrite it
        out_dir = run_dir if metrics["schema"] == METRICS_SCHEMA else run_dir / "report"
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = out / ASSETS
    if assets.exists():
        shutil.rmtree(assets)
    assets.mkdir()
    for img in doc.images():
        if img.png is not None:
            (assets / img.name).write_bytes(img.png)
    md, page = out / "report.md", out / "report.html"
    md.write_text(doc.markdown() + "\n")
    page.write_text(doc.html() + "\n")
    return md, page
