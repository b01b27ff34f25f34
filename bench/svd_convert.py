"""Factor SVD (QR of B and Aᵀ + r×r SVD) against the dense SVD of B·A, which is what SD "resize" scripts do.

Run: python bench/svd_convert.py [--repeats 3] [--threads N]
Prints, per shape and rank, the median time of each, their ratio, and the worst relative gap between σ.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sublora_cli.core.svd import factor_svd

CASES = [(4096, 4096, 64), (4096, 4096, 16), (4096, 11008, 64), (4096, 11008, 16)]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32 factors, median of {args.repeats}")
    print(f"{'out×in':>12} {'r':>4} {'dense SVD s':>12} {'factor SVD s':>13} {'speed-up':>9} {'max rel σ gap':>14}")
    for out, inp, r in CASES:
        g = torch.Generator().manual_seed(0)
        B = torch.randn(out, r, generator=g) / r**0.5
        A = torch.randn(r, inp, generator=g) / inp**0.5
        dense_sigma = torch.linalg.svdvals(B @ A)[:r]
        # resize scripts need U and V too, so the baseline is the thin SVD of the dense product
        dense = median_seconds(lambda: torch.linalg.svd(B @ A, full_matrices=False), args.repeats)  # noqa: B023
        factor = median_seconds(lambda: factor_svd(B, A, 1.0), args.repeats)  # noqa: B023
        sigma = factor_svd(B, A, 1.0).sigma
        gap = float(((sigma - dense_sigma.double()).abs() / sigma.max()).max())
        print(f"{out:>6}×{inp:<5} {r:>4} {dense:>12.3f} {factor:>13.4f} {dense / factor:>8.0f}× {gap:>14.2e}")


if __name__ == "__main__":
    main()
