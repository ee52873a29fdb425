"""Peak memory and time of one forward+backward pass on a very long bag: LongMIL vs TransMIL vs full attention.

Run: python tests/bench/bench_longmil_memory.py [--n 50000] [--dim 1024] [--threads 2]
Each measurement runs in its own subprocess; peak memory is that process's peak RSS
(resource.getrusage ru_maxrss), reported in total and above the RSS it had just before
the pass (torch, model and input already loaded). Full attention (one multi-head
self-attention layer over all instances, scores materialised) cannot hold a 50k bag in
memory, so it is measured on smaller bags and its extra memory and time are extrapolated
quadratically to N (the figure is marked as extrapolated). Models use their default
ModelConfig sizes (hidden 512, 8 heads; LongMIL window 256 with coords).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

GIB = 1024**3


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def _child(model_name: str, n: int, dim: int, threads: int) -> dict[str, float]:
    """One forward+backward pass in this process; returns its figures."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from fedslide.common.config.model import ModelConfig
    from fedslide.common.models import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    features = torch.randn(1, n, dim)
    side = math.ceil(math.sqrt(n))
    idx = torch.arange(n)
    coords = (torch.stack([idx % side, idx // side], dim=1).float() * 256.0).unsqueeze(0)
    labels = torch.tensor([1])
    if model_name == "full_attention":
        cfg = ModelConfig(name="longmil", in_dim=dim)  # LongMIL's sizes, attention over the whole bag
        fc = nn.Sequential(nn.Linear(dim, cfg.hidden_dim), nn.ReLU())
        attn = nn.MultiheadAttention(cfg.hidden_dim, cfg.options.num_heads, batch_first=True)
        head = nn.Linear(cfg.hidden_dim, 2)
        params = [*fc.parameters(), *attn.parameters(), *head.parameters()]

        def step() -> torch.Tensor:
            h = fc(features)
            # need_weights=True makes torch build the full [N, N] attention matrix (the classic formulation)
            out, _ = attn(h, h, h, need_weights=True, average_attn_weights=False)
            return F.cross_entropy(head(out.mean(dim=1)), labels)
    else:
        model = build_model(ModelConfig(name=model_name, in_dim=dim)).train()
        params = list(model.parameters())

        def step() -> torch.Tensor:
            out = model(features, None, coords)
            loss = F.cross_entropy(out.logits, labels)
            return loss + out.aux_loss if out.aux_loss is not None else loss

    before = _rss_bytes()
    start = time.perf_counter()
    step().backward()
    elapsed = time.perf_counter() - start
    assert all(p.grad is not None for p in params)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"seconds": elapsed, "peak_gib": peak / GIB, "extra_gib": (peak - before) / GIB, "base_gib": before / GIB}


def _measure(model_name: str, n: int, dim: int, threads: int, timeout: float) -> dict[str, float] | str:
    """Run one measurement in a fresh subprocess; a failure comes back as its reason."""
    cmd = [sys.executable, __file__, "--child", model_name, "--n", str(n), "--dim", str(dim)]
    cmd += ["--threads", str(threads)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["killed"])[-1]
        return f"failed (exit {done.returncode}): {tail}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def _quadratic_fit(points: list[tuple[int, float]], n: int) -> float:
    """Least-squares a + c*x^2 through points, evaluated at n."""
    xs = [float(x) ** 2 for x, _ in points]
    ys = [y for _, y in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    c = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - c * mx + c * float(n) ** 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000, help="instances in the bag")
    parser.add_argument("--dim", type=int, default=1024, help="feature dim")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per measurement")
    parser.add_argument("--full-sizes", default="1000,2000,4000", help="bag sizes measured for full attention")
    parser.add_argument("--models", default="longmil,transmil,abmil", help="models measured at --n")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.n, args.dim, args.threads)))
        return

    print(f"forward+backward, one bag of N={args.n} instances, D={args.dim}, {args.threads} threads (CPU shared)")
    print(f"{'model':<16}{'N':>8}{'peak GiB':>10}{'extra GiB':>11}{'seconds':>10}  note")
    for name in args.models.split(","):
        result = _measure(name, args.n, args.dim, args.threads, args.timeout)
        if isinstance(result, str):
            print(f"{name:<16}{args.n:>8}  {result}")
        else:
            note = ""
            if name == "longmil":
                note = "target < 4 GiB: " + ("met" if result["peak_gib"] < 4.0 else "MISSED")
            print(
                f"{name:<16}{args.n:>8}{result['peak_gib']:>10.2f}{result['extra_gib']:>11.2f}"
                f"{result['seconds']:>10.1f}  {note}"
            )
    points_mem, points_time = [], []
    for n in (int(s) for s in args.full_sizes.split(",")):
        result = _measure("full_attention", n, args.dim, args.threads, args.timeout)
        if isinstance(result, str):
            print(f"{'full_attention':<16}{n:>8}  {result}")
            continue
        points_mem.append((n, result["extra_gib"]))
        points_time.append((n, result["seconds"]))
        print(
            f"{'full_attention':<16}{n:>8}{result['peak_gib']:>10.2f}{result['extra_gib']:>11.2f}{result['seconds']:>10.1f}"
        )
    if len(points_mem) >= 2:
        extra = _quadratic_fit(points_mem, args.n)
        seconds = _quadratic_fit(points_time, args.n)
        total = int(Path("/proc/meminfo").read_text().split()[1]) * 1024 / GIB
        why = f"exceeds this machine's {total:.0f} GiB" if extra > total else "not run"
        print(
            f"{'full_attention':<16}{args.n:>8}{'':>10}{extra:>11.1f}{seconds:>10.0f}  "
            f"extrapolated by a quadratic fit of the rows above ({why})"
        )


if __name__ == "__main__":
    main()
