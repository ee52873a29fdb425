"""Teacher AUC on 20× features of the frozen vs the VIB-fine-tuned encoder, one site (issue 34).

    python tests/bench/bench_vib_teacher.py --site /tmp/h7_view/site1 [--encoder efficientnet_lite0]
        [--seeds 0 1 2] [--epochs 30] [--json OUT.json]

Run on demand (not collected by pytest), after `fedslide finetune SITE --method vib` wrote
features/<encoder>-vib-<hash12>/high. A gated ABMIL (common/models) trains on the site's train slides (labels.csv
split column) with AdamW for --epochs, one slide per step, and is scored on its test slides (ROC AUC), per seed,
for each feature folder. The fine-tuning saw the train slides' labels only (never val or test).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from fedslide.common.models.abmil import ABMIL
from fedslide.common.training.labels import read_labels


def load(folder: Path, ids: list[str]) -> list[torch.Tensor]:
    out = []
    for slide_id in ids:
        with h5py.File(folder / f"{slide_id}.h5", "r") as f:
            out.append(torch.from_numpy(np.asarray(f["features"][()], dtype=np.float32)))
    return out


def auc(folder: Path, table_path: Path, seed: int, epochs: int) -> float:
    table = read_labels(table_path)
    rows = {s: [r for r in table.rows if r.split == s] for s in ("train", "test")}
    train_x, test_x = (
        load(folder, [r.slide_id for r in rows["train"]]),
        load(folder, [r.slide_id for r in rows["test"]]),
    )
    train_y = [table.label_map[r.label] for r in rows["train"]]
    test_y = [table.label_map[r.label] for r in rows["test"]]
    torch.manual_seed(seed)
    model = ABMIL(train_x[0].shape[1], len(table.classes), hidden_dim=128, attention_dim=64, gated=True)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        model.train()
        for i in rng.permutation(len(train_x)):
            loss = F.cross_entropy(model(train_x[i][None]).logits, torch.tensor([train_y[i]]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        scores = [float(torch.softmax(model(x[None]).logits, -1)[0, 1]) for x in test_x]
    return float(roc_auc_score(test_y, scores))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--site", type=Path, required=True)
    ap.add_argument("--encoder", default="efficientnet_lite0")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--vib-features", default=None, help="the VIB feature folder (default: the site's first `<encoder>-vib-*`)"
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out: dict[str, list[float]] = {}
    vib = args.vib_features or next(
        (d.name for d in sorted((args.site / "features").glob(f"{args.encoder}-vib-*")) if (d / "high").is_dir()),
        f"{args.encoder}-vib-<hash12>",
    )
    for arm, name in (("frozen", args.encoder), ("vib", vib)):
        if not (args.site / "features" / name / "high").is_dir():
            print(f"{arm:6s} no features/{name}/high: skipped")
            continue
        out[arm] = [
            auc(args.site / "features" / name / "high", args.site / "labels.csv", s, args.epochs) for s in args.seeds
        ]
        print(f"{arm:6s} test AUC per seed {[round(a, 3) for a in out[arm]]} mean {np.mean(out[arm]):.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"site": str(args.site), "seeds": args.seeds, "auc": out}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
