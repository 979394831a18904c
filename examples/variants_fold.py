"""Fold the BatchNorms of a trained model into the layers before them, for inference.

An eval-mode BatchNorm is a per-channel affine map, so ``Linear -> BatchNorm1d`` (and
``Conv2d -> BatchNorm2d``) is one layer with rescaled weights. ``xbn.fold_batchnorm`` returns a
copy where each such BN is an ``Identity``: the same outputs (to float32 rounding) without the
BN's pass over the activations. This script trains a 784-512-512-10 MLP with BatchNorm1d for a
few steps on random data (only the statistics matter here), folds it, and compares outputs and
the time of an eval forward.

    python examples/variants_fold.py                 # a few seconds
    XBN_NUM_THREADS=1 python examples/variants_fold.py --batch 1024 --repeat 50

What folding saves is the BN passes; next to three BLAS matmuls they are small on a CPU, so the
whole-forward gain is small there too. The timings are interleaved and the best is kept, but on
a shared machine they still move with the load: the BN pass alone is printed for that reason.
On a machine with other work running, numba's default OpenMP threads can make a BN pass take
milliseconds; XBN_NUM_THREADS=1 gives steadier figures.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import xbn
from xbn.nn import Linear, ReLU, Sequential


def best_times(fns, x, repeat: int) -> list[float]:
    """The best of ``repeat`` timings of each fn(x), interleaved so that load hits them alike."""
    for fn in fns:
        fn(x)  # warm up (the compiled engine compiles on first use)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            start = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - start)
    return [min(ts) for ts in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256, help="eval batch size (default 256)")
    parser.add_argument("--repeat", type=int, default=30, help="timed forwards, the best is kept")
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    model = Sequential(
        Linear(784, 512, backend="numpy", rng=rng),
        xbn.BatchNorm1d(512, backend="numpy"),
        ReLU(),
        Linear(512, 512, backend="numpy", rng=rng),
        xbn.BatchNorm1d(512, backend="numpy"),
        ReLU(),
        Linear(512, 10, backend="numpy", rng=rng),
    )
    opt = xbn.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for _ in range(20):  # move the running statistics and the affine parameters away from 0 and 1
        x = rng.normal(1.0, 2.0, size=(128, 784)).astype(np.float32)
        y = model(x)
        opt.zero_grad()
        model.backward(np.ones_like(y) / y.size)
        opt.step()
    model.eval()

    folded = xbn.fold_batchnorm(model)
    print(folded)
    x = rng.normal(1.0, 2.0, size=(args.batch, 784)).astype(np.float32)
    want, got = model(x), folded(x)
    err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
    print(f"max |folded - model| / max |model| = {err:.2e} (float32)")

    h = model[0](x)  # what the first BatchNorm normalizes
    t_model, t_folded = best_times([model, folded], x, args.repeat)
    (t_bn,) = best_times([model[1]], h, args.repeat)
    print(f"eval forward, batch {args.batch}, best of {args.repeat}:")
    print(f"  model {t_model * 1e3:.3f} ms, folded {t_folded * 1e3:.3f} ms ({t_model / t_folded:.3f}x)")
    print(f"  one BatchNorm1d(512) eval pass alone: {t_bn * 1e3:.3f} ms (the model has two)")


if __name__ == "__main__":
    main()
