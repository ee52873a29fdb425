"""OOD score benchmark (run on demand, not by pytest): does the bundle's OOD score separate slides unlike the
training slides from in-distribution test slides?

    OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_ood.py --out /tmp/fedslide-ood [--slides-um 1200]

One synthetic "lab" (`fedslide.client.synth`, mild per-slide stain variation: perturb_stain strength 0.5 around the
reference stain) gives the training, validation and in-distribution test slides (half with tumour). Against its
test slides the score (`common.distillation.ood`, fitted on the training slides' 5x features of the default
encoder, threshold = 0.99 quantile of the validation slides' scores) is asked to pick out
(a) a held-out site with a strong stain shift: one lab stain drawn at perturb_stain strength `--shift` (default 3;
    1 ≈ a typical lab difference; mild per-slide variation on top), the same tissue generator;
(b) slides of another generator: the real H&E slides in ../shared/data/real (CMU-1-Small-Region.svs at its
    0.499 µm/px; tcga-cr-7395-01a-01-ts1.svs, which has no mpp, read at 0.5 µm/px).
Reported: AUROC of the score (in-distribution test = 0, the other set = 1; sklearn roc_auc_score), and the share of
each set flagged at the threshold. Only 5x patches are read (as `fedslide predict` does). Output: <out>/bench_ood.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from fedslide.client.encoders import build_encoder
from fedslide.client.inference import predict_slide
from fedslide.client.synth.slide import write_slide
from fedslide.client.synth.stains import Stain, perturb_stain
from fedslide.common.config.model import ModelConfig
from fedslide.common.config.predict import PredictConfig
from fedslide.common.config.preprocess import EncoderConfig, TilingConfig, TissueConfig
from fedslide.common.distillation.bundle import BundleMeta, StudentBundle
from fedslide.common.distillation.ood import OODStats, slide_embedding
from fedslide.common.models.registry import build_model

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "real"
REAL_MPP = {"CMU-1-Small-Region.svs": None, "tcga-cr-7395-01a-01-ts1.svs": 0.5}  # None: the file's own mpp


def _bundle(encoder: torch.nn.Module) -> StudentBundle:
    """A raw-input student of the default encoder: only its 5x features are used here, not its predictions."""
    mc = ModelConfig(name="abmil", in_dim=encoder.dim, num_classes=2, hidden_dim=16, attention_dim=8)
    meta = BundleMeta(
        encoder_name=encoder.name,
        encoder_weights_hash=encoder.weights_hash,
        encoder_dim=encoder.dim,
        encoder_fingerprint=encoder.fingerprint,
        low_mpp=2.0,
        low_patch_size=256,
        high_mpp=0.5,
        high_patch_size=256,
        child_grid=4,
        token_grid=0,
        student_input="raw",
        class_names=["normal", "tumor"],
        tissue=TissueConfig().model_dump(mode="json"),
        tiling=TilingConfig().model_dump(mode="json"),
    )
    return StudentBundle(meta, None, build_model(mc), None, mc, None)


def _embed(path: Path, bundle: StudentBundle, encoder: torch.nn.Module, mpp: float | None = None) -> np.ndarray:
    cfg = PredictConfig.model_validate(
        {"num_workers": 0, "batch_size": 16, "progress": False, "slide": {"mpp_override": mpp}}
    )
    pred = predict_slide(path, bundle, encoder, cfg, keep_arrays=True)
    assert pred.low_pass is not None
    return slide_embedding(pred.low_pass.features)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--slides-um", type=float, default=1200.0, help="side of each synthetic slide, µm")
    parser.add_argument("--train", type=int, default=16)
    parser.add_argument("--val", type=int, default=6)
    parser.add_argument("--test", type=int, default=12)
    parser.add_argument("--shifted", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shift", type=float, default=3.0, help="perturb_stain strength of the shifted site's stain")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    slides = args.out / "slides"
    slides.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    encoder = build_encoder(EncoderConfig())
    bundle = _bundle(encoder)
    lab_stain = perturb_stain(Stain(), args.shift, np.random.default_rng(args.seed + 1000))  # the shifted site's stain
    groups: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": [], "shifted": [], "real": []}
    plan = [(g, n) for g, n in (("train", args.train), ("val", args.val), ("test", args.test))]
    plan.append(("shifted", args.shifted))
    k = 0
    for group, n in plan:
        for i in range(n):
            base = lab_stain if group == "shifted" else Stain()
            stain = perturb_stain(base, 0.5, rng)
            path = slides / f"{group}_{i}.tif"
            if not path.is_file():
                write_slide(
                    path,
                    args.slides_um,
                    args.slides_um,
                    0.5,
                    "generic",
                    seed=args.seed * 1000 + k,
                    tumor=i % 2 == 1,
                    tumor_fraction=0.3,
                    stain=stain,
                )
            k += 1
            groups[group].append(_embed(path, bundle, encoder))
            print(f"{group} {i}: done ({time.perf_counter() - start:.0f} s)", flush=True)
    for name, mpp in REAL_MPP.items():
        if (REAL / name).is_file():
            groups["real"].append(_embed(REAL / name, bundle, encoder, mpp))
    stats = OODStats.fit(np.stack(groups["train"])).with_threshold(np.stack(groups["val"]))
    scores = {g: stats.scores(np.stack(v)).tolist() for g, v in groups.items() if v}
    result: dict[str, object] = {
        "command": f"OMP_NUM_THREADS=1 .venv/bin/python tests/bench/bench_ood.py --out {args.out} --shift {args.shift}",
        "settings": vars(args) | {"out": str(args.out)},
        "threshold": stats.threshold,
        "scores": scores,
        "flagged_share": {g: float(np.mean([s > (stats.threshold or np.inf) for s in v])) for g, v in scores.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    for group in ("shifted", "real"):
        if group in scores:
            y = [0] * len(scores["test"]) + [1] * len(scores[group])
            result[f"auroc_test_vs_{group}"] = float(roc_auc_score(y, scores["test"] + scores[group]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_ood.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "scores"}, indent=2))


if __name__ == "__main__":
    main()
