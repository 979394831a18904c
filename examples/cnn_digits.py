"""A small convnet with BatchNorm2d, trained by hand with xbn, folded for inference, read by torch.

The network is conv3x3(16) -> BatchNorm2d -> ReLU -> conv3x3(32) -> BatchNorm2d -> ReLU ->
global average pool -> Linear(10) on scikit-learn's 8x8 digits. After training, the BatchNorms
are folded into the convolutions before them (``xbn.fold_batchnorm``) and the folded network is
checked to classify the test set exactly as the trained one. With torch installed, both
state_dicts are loaded into the same network built from ``torch.nn`` and give the same logits:
xbn's layers store their weights as torch's do, under torch's names.

    python examples/cnn_digits.py
    python examples/cnn_digits.py --epochs 1 --backend torch
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import xbn
from xbn.nn import Conv2d, Flatten, GlobalAvgPool2d, Linear, ReLU, Sequential, softmax_cross_entropy


def build(backend: str, seed: int) -> Sequential:
    rng = np.random.default_rng(seed)  # one Generator: each layer draws the next weights
    return Sequential(
        Conv2d(1, 16, 3, padding=1, backend=backend, rng=rng),
        xbn.BatchNorm2d(16, backend=backend),
        ReLU(),
        Conv2d(16, 32, 3, padding=1, backend=backend, rng=rng),
        xbn.BatchNorm2d(32, backend=backend),
        ReLU(),
        GlobalAvgPool2d(),
        Flatten(),
        Linear(32, 10, backend=backend, rng=rng),
    )


def host(a: Any) -> np.ndarray:
    """A NumPy copy of an array of any backend."""
    if type(a).__module__.startswith("cupy"):
        return a.get()
    if hasattr(a, "detach"):  # torch
        return a.detach().cpu().numpy()
    return np.from_dlpack(a).copy()  # NumPy, array-api-strict


def torch_twin(folded: bool) -> Any:
    """The same architecture in torch.nn; the folded one has Identity where the BatchNorms were."""
    import torch

    def norm(c: int) -> torch.nn.Module:
        return torch.nn.Identity() if folded else torch.nn.BatchNorm2d(c)

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1),
        norm(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1),
        norm(32),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(32, 10),
    ).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="epochs (default 8)")
    parser.add_argument("--lr", type=float, default=0.2, help="SGD learning rate (default 0.2)")
    parser.add_argument("--backend", default="numpy", help="numpy (default), torch, array_api_strict, cupy")
    args = parser.parse_args()
    if args.epochs < 1 or not args.lr > 0:
        parser.error("--epochs must be >= 1 and --lr > 0")

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (((a - mean) / std).reshape(-1, 1, 8, 8).astype(np.float32) for a in (x_tr, x_te))

    net = build(args.backend, seed=0)
    xp, dev = net[0].xp, net[0].device
    xtr, ytr = xp.asarray(x_tr, device=dev), xp.asarray(y_tr, device=dev)
    xte, yte = xp.asarray(x_te, device=dev), xp.asarray(y_te, device=dev)
    opt = xbn.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    rng = np.random.default_rng(1)

    def accuracy(model: xbn.Module) -> float:
        logits = model(xte, training=False)
        return float(xp.mean(xp.astype(xp.argmax(logits, axis=1) == yte, xp.float32)))

    for epoch in range(1, args.epochs + 1):
        net.train()
        order = xp.asarray(rng.permutation(len(x_tr)), device=dev)
        for i in range(len(x_tr) // 64):
            idx = order[i * 64 : (i + 1) * 64]
            opt.zero_grad()
            loss, dlogits = softmax_cross_entropy(net(xp.take(xtr, idx, axis=0)), xp.take(ytr, idx, axis=0))
            net.backward(dlogits)
            opt.step()
        print(f"epoch {epoch:2d}  loss {float(loss):.4f}  test accuracy {accuracy(net):.1%}")

    net.eval()
    folded = xbn.fold_batchnorm(net)
    same = bool(xp.all(xp.argmax(net(xte), axis=1) == xp.argmax(folded(xte), axis=1)))
    print(f"folded: test accuracy {accuracy(folded):.1%}, same predictions as the trained network: {same}")

    try:
        import torch
    except ImportError:
        print("torch is not installed: skipping the state_dict check")
        return
    inputs = torch.from_numpy(x_te)
    for model, is_folded in ((net, False), (folded, True)):
        twin = torch_twin(is_folded)
        twin.load_state_dict({k: torch.from_numpy(host(v)) for k, v in model.state_dict().items()})
        with torch.no_grad():
            diff = np.max(np.abs(twin(inputs).numpy() - host(model(xte))))
        print(
            f"torch.nn with the {'folded' if is_folded else 'trained'} state_dict: "
            f"same logits (max abs difference {diff:.1e})"
        )


if __name__ == "__main__":
    main()
