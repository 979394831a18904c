"""Batch renormalization at a tiny batch size: BatchNorm1d against BatchRenorm1d.

With a few samples per batch, BatchNorm's training-mode statistics are noisy and unlike the
running statistics eval uses, so a network that trains well can evaluate badly. BatchRenorm
corrects each batch's statistics towards the running ones (r, d), so training sees what eval
will see. Here: 2 -> 64 -> norm -> ReLU -> 64 -> norm -> ReLU -> 3 on three interleaved spirals,
SGD with momentum, the same seeds for both; renorm warms up from rmax = 1, dmax = 0 (batch norm)
to rmax = 3, dmax = 5 over the first 40% of the steps, as the paper does.

    python examples/variants_small_batch.py                 # batch 4, about 30 s
    python examples/variants_small_batch.py --batch 2 --seeds 1
"""

from __future__ import annotations

import argparse
import time

import numpy as np

import xbn
from xbn.nn import Linear, ReLU, Sequential, softmax_cross_entropy


def spirals(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.25, 1.0, n_per_class)
    xs, ys = [], []
    for k in range(3):
        angle = 4.0 * t + 2 * np.pi * k / 3 + rng.normal(scale=0.15, size=n_per_class)
        xs.append(np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1))
        ys.append(np.full(n_per_class, k))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def norm_layer(kind: str, c: int) -> xbn.BatchNorm:
    # a slow running average (the paper's alpha = 0.01): with tiny batches each one is noisy
    if kind == "BatchNorm1d":
        return xbn.BatchNorm1d(c, momentum=0.01, backend="numpy")
    return xbn.BatchRenorm1d(c, rmax=1.0, dmax=0.0, momentum=0.01, backend="numpy")


def train(kind: str, batch: int, steps: int, seed: int, data: tuple) -> tuple[float, float, float]:
    """Eval-mode test accuracy, training-mode test accuracy (batches of ``batch``), seconds."""
    x, y, train_idx, test_idx = data
    rng = np.random.default_rng(seed)
    net = Sequential(
        Linear(2, 64, backend="numpy", rng=rng),
        norm_layer(kind, 64),
        ReLU(),
        Linear(64, 64, backend="numpy", rng=rng),
        norm_layer(kind, 64),
        ReLU(),
        Linear(64, 3, backend="numpy", rng=rng),
    )
    opt = xbn.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    renorms = [m for m in net.modules() if isinstance(m, xbn.BatchRenorm)]
    start = time.perf_counter()
    for step in range(steps):
        warm = min(1.0, step / (0.4 * steps))
        for m in renorms:
            m.rmax, m.dmax = 1.0 + 2.0 * warm, 5.0 * warm
        idx = rng.choice(train_idx, size=batch, replace=False)
        _, dlogits = softmax_cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        net.backward(dlogits)
        opt.step()
    seconds = time.perf_counter() - start
    net.eval()
    eval_acc = float(np.mean(np.argmax(net(x[test_idx]), axis=1) == y[test_idx]))
    net.train()
    # the same test points in training mode, a batch at a time: what the network saw while training
    hits = []
    for i in range(0, len(test_idx) - batch + 1, batch):
        b = test_idx[i : i + batch]
        hits.append(np.argmax(net(x[b]), axis=1) == y[b])
    return eval_acc, float(np.mean(np.concatenate(hits))), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="samples per training batch (default 4)")
    parser.add_argument("--steps", type=int, default=3000, help="SGD steps (default 3000)")
    parser.add_argument("--seeds", type=int, default=2, help="runs per layer (default 2)")
    args = parser.parse_args()

    x, y = spirals(300, np.random.default_rng(123))
    perm = np.random.default_rng(7).permutation(len(x))
    data = (x, y, perm[300:], perm[:300])
    print(f"spirals, 600 training / 300 test points, batch {args.batch}, {args.steps} steps, numpy backend")
    print(f"{'layer':<14} {'seed':>4} {'eval acc':>9} {'train-mode acc':>15} {'seconds':>8}")
    for kind in ("BatchNorm1d", "BatchRenorm1d"):
        for seed in range(args.seeds):
            eval_acc, train_acc, seconds = train(kind, args.batch, args.steps, seed, data)
            print(f"{kind:<14} {seed:>4} {eval_acc:>9.3f} {train_acc:>15.3f} {seconds:>8.1f}")


if __name__ == "__main__":
    main()
