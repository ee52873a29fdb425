"""A site's steps of the federated clinical (BD) phase (`[federation.clinical] enabled = true`).

- handshake: the clinical sums of its training slides with a complete row (withheld below suppress-below slides);
- each round (`phases.CLINICAL`): the global BD model validated on its val slides, then trained for
  rounds.clinical-local-epochs epochs on its training slides' student instances (the final adapter's output, unstandardised,
  exactly what `StudentBundle.student_instances` builds at prediction) and clinical rows (`client.clinical_round`);
- final evaluation: the global BD model and the pooled normalisation kept in the site's bundle (`clinical.pt`).

A site without `clinical.csv` (or whose rows are all missing) trains the single-modal branch and the prompt only.
"""

from __future__ import annotations

import zlib

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from fedslide.client.clinical_round import SiteClinicalData, clinical_round, load_bd_record, mean_loss
from fedslide.client.site_run import SiteRun
from fedslide.common.clinical import load_site_clinical, site_clinical_sums
from fedslide.common.config.clinical import ClinicalConfig
from fedslide.common.distillation.adapter import build_adapter
from fedslide.common.distillation.clinical_model import ClinicalModel, build_bd, federated_bd_config
from fedslide.common.distillation.stages import student_input
from fedslide.common.distillation.student import student_bags
from fedslide.common.federation import per_class
from fedslide.common.federation import phases as ph
from fedslide.common.federation import protocol as p
from fedslide.common.federation.feature_stats import stats_from_record
from fedslide.common.federation.models import adapter_spec, fingerprint, load_record
from fedslide.common.metrics import classification_metrics
from fedslide.common.training.bd_fit import bd_probs
from fedslide.common.training.standardize import FeatureStats, FeatureSums

Metrics = dict[str, float | int]
BAGS_CACHE = "clinical_bags.pt"  # the site's student instances under one global adapter (fingerprinted)
_SEED_KEY = zlib.crc32(b"clinical")


def bd_config(site: SiteRun) -> ClinicalConfig:
    """The run's `[federation.clinical]` as the BD model's config (its local epochs: rounds.clinical-local-epochs)."""
    return federated_bd_config(site.cfg)


def raw_vectors(site: SiteRun, idx: np.ndarray) -> np.ndarray:
    """Raw clinical vectors [len(idx), encoded_dim] of the site's slides `idx` (NaN rows: no complete row, or no
    clinical.csv); ClinicalDataError naming file, row and column for a bad cell."""
    cfg = site.cfg.clinical
    table = load_site_clinical(site.site_dir, cfg)
    if table is None:
        return np.full((len(idx), cfg.encoded_dim), np.nan)
    slides = [site.data().slides[int(i)] for i in idx]
    patient_of = {s.slide_id: s.patient_id.split("/", 1)[-1] for s in slides}
    return table.lookup([s.slide_id for s in slides], patient_of)


def clinical_release(site: SiteRun) -> FeatureSums:
    """The handshake's clinical sums of the training slides (all zero below suppress-below slides)."""
    return site_clinical_sums(raw_vectors(site, site.split("train")), site.cfg.min_count)


def _instances(site: SiteRun, adapter: ArrayRecord) -> dict[str, np.ndarray]:
    """slide key -> student instances under the global adapter (cached at the site per adapter)."""
    key = fingerprint(adapter)
    cached = site.load(BAGS_CACHE, key)
    if cached is not None:
        return dict(cached["bags"])
    assert site.facts is not None
    model = load_record(build_adapter(adapter_spec(site.cfg, site.facts)), adapter).eval()
    data = site.data()
    bags = {
        k: v[0] for k, v in student_bags(model, data, student_input(site.cfg.kd.student_input, data.has_tokens)).items()
    }
    site.save(BAGS_CACHE, {"fingerprint": key, "bags": bags})
    return bags


def _split_data(site: SiteRun, content: RecordDict, split: str) -> SiteClinicalData:
    bags = _instances(site, content.array_records[p.ADAPTER])
    data = site.data()
    idx = np.arange(len(data.slides)) if split == "all" else site.split(split)
    return SiteClinicalData(
        [bags[data.slides[int(i)].key] for i in idx], data.labels[idx].astype(np.int64), raw_vectors(site, idx)
    )


def _norm(site: SiteRun, content: RecordDict) -> FeatureStats:
    return stats_from_record(content.array_records[ph.CLINICAL_NORM], site.cfg.clinical.encoded_dim)


def _model_shape(site: SiteRun, content: RecordDict) -> tuple[int, int]:
    assert site.facts is not None
    bags = _instances(site, content.array_records[p.ADAPTER])
    width = next(iter(bags.values())).shape[1] if bags else site.facts.feature_dim
    return int(width), len(site.facts.classes)


def _val(site: SiteRun, content: RecordDict, cfg: ClinicalConfig, in_dim: int, classes: int) -> Metrics:
    val = _split_data(site, content, "val")
    if not val.bags:
        return {ph.VAL_LOSS: 0.0, ph.VAL_N: 0}
    model = build_bd(in_dim, cfg, classes)
    load_bd_record(model, content.array_records[p.ARRAYS])
    return {ph.VAL_LOSS: mean_loss(model, val, _norm(site, content), cfg), ph.VAL_N: len(val.bags)}


def clinical_train(
    site: SiteRun, content: RecordDict, server_round: int, mu: float = 0.0
) -> tuple[ArrayRecord, Metrics]:
    """Validate the global BD model on the val slides, then one local round on the training slides; the BD arrays
    and the declared metrics (`mu` is not used: no proximal term in this phase)."""
    cfg = bd_config(site)
    in_dim, classes = _model_shape(site, content)
    metrics = _val(site, content, cfg, in_dim, classes)
    seed = int(
        np.random.SeedSequence([site.cfg.seed, zlib.crc32(site.name.encode()), _SEED_KEY, server_round]).generate_state(
            1
        )[0]
    )
    reply = clinical_round(
        content.array_records[p.ARRAYS],
        _split_data(site, content, "train"),
        _norm(site, content),
        cfg,
        in_dim,
        classes,
        seed,
    )
    out = reply.metric_records[p.METRICS]
    metrics.update({k: p.number(out, k) for k in out})
    for key in (ph.NUM_EXAMPLES, ph.N_CLINICAL):  # counts stay whole numbers
        metrics[key] = int(metrics[key])
    metrics[ph.EPOCHS] = cfg.epochs
    return reply.array_records[p.ARRAYS], metrics


def validate_clinical(site: SiteRun, content: RecordDict) -> Metrics:
    """Validation loss of the global BD model on the site's val slides."""
    cfg = bd_config(site)
    in_dim, classes = _model_shape(site, content)
    return {ph.NUM_EXAMPLES: int(site.split("train").size), **_val(site, content, cfg, in_dim, classes)}


def bundle_model(site: SiteRun, content: RecordDict) -> ClinicalModel | None:
    """The final BD model for the site's bundle from the evaluation message (None when it carries none)."""
    if ph.BD_MODEL not in content.array_records or ph.CLINICAL_NORM not in content.array_records:
        return None
    cfg = bd_config(site)  # records the phase's local epochs per round
    record = content.array_records[ph.BD_MODEL]
    in_dim, classes = _model_shape(site, content)
    model = build_bd(in_dim, cfg, classes)
    load_bd_record(model, record)
    return ClinicalModel(model.eval(), cfg, _norm(site, content), in_dim, classes)


def evaluation_metrics(site: SiteRun, content: RecordDict, model: ClinicalModel | None, split: str) -> Metrics:
    """The final BD model's metrics on the site's `split` slides ("all": every labelled slide), read as prediction
    reads them: `bd_clinical.<metric>` with the clinical rows as recorded (multi-modal branch where a row is
    complete), `bd_no_clinical.<metric>` with every row removed (single-modal branch), and `bd-with-clinical`
    (slides with a complete row); none without a BD model or slides."""
    if model is None:
        return {}
    data = _split_data(site, content, split)
    if not data.bags:
        return {}
    out: Metrics = {ph.BD_WITH_CLINICAL: data.with_clinical}
    for name, raw in zip(ph.BD_EVALUATED, (data.raw, np.full_like(data.raw, np.nan))):
        probs = bd_probs(model.model, data.bags, raw, model.stats, model.cfg.batch_size)
        out.update(bd_metric_values(name, data.labels, probs, site.cfg.ece_bins))
    return out


def bd_metric_values(name: str, labels: np.ndarray, probs: np.ndarray, ece_bins: int) -> Metrics:
    """`<name>.<metric>` of one BD reading: finite values only (a one-class split has no AUC; only finite scalars
    may leave), `<name>.n`, and per-class metrics for C > 2."""
    picked = np.clip(probs[np.arange(len(probs)), labels], 1e-12, None)
    values = {**classification_metrics(labels, probs), "loss": float(-np.log(picked).mean())}
    out: Metrics = {f"{name}.{k}": float(v) for k, v in values.items() if v is not None and np.isfinite(v)}
    out[f"{name}.n"] = len(labels)
    out.update(per_class.site_metrics(name, labels, probs, ece_bins))  # C > 2 only
    return out
