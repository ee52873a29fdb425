"""Training-epoch throughput (bags/s) of padded multi-bag batches vs one bag at a time.

Run: `python tests/bench/bench_batching.py [--bags 200] [--batch 8] [--dim 1024] [--threads 2] [--device cpu]`,
or on real feature files: `... --sites C/site1 C/site2 C/site3 --resolution high|low` (every slide of the
sites, its high- or low-res bag). Same bags (synthetic: N uniform in [min, max] instances, D dims), same
ABMIL model, same optimizer; only the batching differs. Prints, per mode, the median and best bags/s over
interleaved trials and the speed-up of the medians over batch 1.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedslide.common.models.abmil import ABMIL
from fedslide.common.training.cohort import Cohort, Slide
from fedslide.common.training.data import BagDataset, eval_loader, train_loader
from fedslide.common.training.loop import evaluate, train_epoch


def synthetic_cohort(bags: int, dim: int, min_n: int, max_n: int, seed: int) -> Cohort:
    """In-memory cohort of random bags (a little class signal in the first dims)."""
    rng = np.random.default_rng(seed)
    slides, store = [], {}
    for i in range(bags):
        n = int(rng.integers(min_n, max_n + 1))
        label = i % 2
        x = rng.standard_normal((n, dim), dtype=np.float32)
        x[: n // 10, :8] += label
        sid = f"s{i:04d}"
        store[sid] = (x, None)
        slides.append(Slide(sid, label, sid, None, Path(f"{sid}.h5"), n))
    return Cohort(slides, ("0", "1"), dim, False, {}, bags=store)


@dataclass
class Mode:
    """One way of batching the same bags, with its own model and optimizer."""

    name: str
    train: bool
    batch: int
    group: bool = True
    rates: list[float] = field(default_factory=list)


def _runner(cohort: Cohort, mode: Mode, seed: int, device: torch.device) -> Callable[[], float]:
    """A function that runs one timed pass of `mode` and returns bags/s (after a short warm-up)."""
    torch.manual_seed(seed)
    model = ABMIL(cohort.feature_dim, 2, dropout=0.0).to(device)
    dataset = BagDataset(cohort, range(len(cohort.slides)))
    loss = nn.CrossEntropyLoss()
    if mode.train:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
        loader = train_loader(dataset, mode.batch, seed, group_by_length=mode.group)
        train_epoch(model, list(islice(iter(loader), 3)), optimizer, loss, device)

        def run() -> float:
            start = time.perf_counter()
            train_epoch(model, loader, optimizer, loss, device)
            return len(dataset) / (time.perf_counter() - start)

        return run
    loader = eval_loader(dataset, mode.batch)
    evaluate(model, list(islice(iter(loader), 3)), loss, device)

    def run_eval() -> float:
        start = time.perf_counter()
        evaluate(model, loader, loss, device)
        return len(dataset) / (time.perf_counter() - start)

    return run_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bags", type=int, default=200)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--min-n", type=int, default=200)
    parser.add_argument("--max-n", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--trials", type=int, default=3, help="timed passes per mode, interleaved across modes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i] (per-batch .item() syncs the timing)")
    parser.add_argument(
        "--sites", type=Path, nargs="+", default=None, help="real site directories instead of synthetic bags"
    )
    parser.add_argument("--resolution", choices=["high", "low"], default="high", help="with --sites: which bags")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.sites:
        from fedslide.common.distillation.data import load_sites

        data = load_sites(list(args.sites), seed=args.seed)
        cohort = data.cohort(data.high_bags() if args.resolution == "high" else data.low_bags())
        sizes = [s.num_instances for s in cohort.slides]
        print(
            f"{len(sizes)} {args.resolution}-res bags of {min(sizes)}-{max(sizes)} instances (mean {np.mean(sizes):.1f}) "
            f"from {len(args.sites)} site(s), D={cohort.feature_dim}, ABMIL, {args.threads} torch thread(s), "
            f"{args.device}, torch {torch.__version__}"
        )
    else:
        cohort = synthetic_cohort(args.bags, args.dim, args.min_n, args.max_n, args.seed)
        print(
            f"{args.bags} bags of {args.min_n}-{args.max_n} instances, D={args.dim}, ABMIL, "
            f"{args.threads} torch thread(s), {args.device}, torch {torch.__version__}"
        )
    modes = [
        Mode("train, batch 1", True, 1, False),
        Mode(f"train, batch {args.batch}, random batches", True, args.batch, False),
        Mode(f"train, batch {args.batch}, length-grouped", True, args.batch, True),
        Mode("eval, batch 1", False, 1),
        Mode(f"eval, batch {args.batch}, length-sorted", False, args.batch),
    ]
    runners = [_runner(cohort, mode, args.seed, torch.device(args.device)) for mode in modes]
    for _ in range(args.trials):  # interleaved, so load from other processes hits every mode alike
        for mode, run in zip(modes, runners):
            mode.rates.append(run())
    base = {True: statistics.median(modes[0].rates), False: statistics.median(modes[3].rates)}
    print(f"{'mode':<40} {'median':>8} {'best':>8}  bags/s   speed-up (median)")
    for mode in modes:
        median = statistics.median(mode.rates)
        print(f"{mode.name:<40} {median:8.1f} {max(mode.rates):8.1f}           x{median / base[mode.train]:.2f}")


if __name__ == "__main__":
    main()
