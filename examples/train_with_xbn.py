"""Use xbn's BatchNorm1d inside your own hand-written training loop.

Your framework owns its layers as plain NumPy arrays and does its own backward pass; xbn only
provides the batch normalization: call ``bn.forward`` / ``bn.backward`` where the layer sits,
and update ``bn.weight.data`` / ``bn.bias.data`` from their ``.grad`` like your own weights.

The task: classify points of three interleaved spirals with 2 -> 64 -> BN -> ReLU -> 3.

    python examples/train_with_xbn.py            # about a second
    python examples/train_with_xbn.py --steps 50
"""

from __future__ import annotations

import argparse

import numpy as np

import xbn


def spirals(n_per_class: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(0.25, 1.0, n_per_class)
    xs, ys = [], []
    for k in range(3):
        angle = 4.0 * t + 2 * np.pi * k / 3 + rng.normal(scale=0.15, size=n_per_class)
        xs.append(np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1))
        ys.append(np.full(n_per_class, k))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500, help="SGD steps (default 1500)")
    parser.add_argument("--lr", type=float, default=0.2)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x, y = spirals(200, rng)
    test = rng.permutation(len(x))[:120]
    train = np.setdiff1d(np.arange(len(x)), test)

    # Your own parameters: plain NumPy arrays.
    w1 = rng.normal(scale=np.sqrt(2 / 2), size=(2, 64)).astype(np.float32)
    b1 = np.zeros(64, dtype=np.float32)
    w2 = rng.normal(scale=np.sqrt(1 / 64), size=(64, 3)).astype(np.float32)
    b2 = np.zeros(3, dtype=np.float32)
    # xbn's layer, on the same backend as your arrays.
    bn = xbn.BatchNorm1d(64, backend="numpy")

    def forward(xb: np.ndarray, training: bool) -> tuple[np.ndarray, tuple]:
        h = xb @ w1 + b1
        a = bn.forward(h, training=training)
        r = np.maximum(a, 0)
        return r @ w2 + b2, (xb, a, r)

    for step in range(1, args.steps + 1):
        idx = rng.choice(train, size=64, replace=False)
        logits, (xb, a, r) = forward(x[idx], training=True)

        # Softmax cross-entropy and its gradient.
        z = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        loss = -np.log(p[np.arange(64), y[idx]]).mean()
        dlogits = p
        dlogits[np.arange(64), y[idx]] -= 1
        dlogits /= 64

        # Your backward pass, with xbn's backward where the BN layer sits.
        dw2, db2 = r.T @ dlogits, dlogits.sum(axis=0)
        da = (dlogits @ w2.T) * (a > 0)
        dh = bn.backward(da)  # fills bn.weight.grad and bn.bias.grad
        dw1, db1 = xb.T @ dh, dh.sum(axis=0)

        # Plain SGD on your arrays and on BN's gamma and beta.
        for param, grad in ((w1, dw1), (b1, db1), (w2, dw2), (b2, db2)):
            param -= args.lr * grad
        for p_bn in bn.parameters():
            p_bn.data = p_bn.data - args.lr * p_bn.grad
            p_bn.grad = None  # BN grads accumulate, as in PyTorch: clear them

        if step % max(1, args.steps // 5) == 0 or step == args.steps:
            print(f"step {step:5d}  loss {loss:.4f}")

    # Evaluation uses BN's running statistics: no batch needed, one sample at a time works.
    for name, ids in (("train", train), ("test", test)):
        pred = forward(x[ids], training=False)[0].argmax(axis=1)
        print(f"{name} accuracy {np.mean(pred == y[ids]):.1%}")


if __name__ == "__main__":
    main()
