"""``xbn demo``: what BatchNorm buys, shown in seconds on a small classifier.

We train the same MLP (64 -> 128 -> 128 -> 10, ReLU) on scikit-learn's bundled 8x8 digits, once
plain and once with :class:`xbn.BatchNorm1d` after each hidden Linear layer, at a normal and at a
high learning rate. Both variants start from identical Linear weights, see the same mini-batches
in the same order, and use the same optimizer (SGD with momentum 0.9), so BatchNorm is the only
difference. The table and the plot show final test accuracy, the best training loss, how many
epochs each run needs to reach a target test accuracy, and what an epoch costs.

Everything below is ordinary code you can copy: a network from :mod:`xbn.nn`, a training loop
with explicit ``forward`` / ``backward`` / ``step``, and evaluation in eval mode (BatchNorm then
uses its running statistics instead of the batch's).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

import xbn
from xbn.backends import BackendUnavailableError, resolve
from xbn.nn import Linear, ReLU, Sequential, softmax_cross_entropy

HIDDEN = (128, 128)
PLOT_NAME = "xbn-demo.png"


# -- command line ----------------------------------------------------------------------------

def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="numpy",
                        help='array backend: numpy (default), torch, array_api_strict, or "cupy" on a GPU')
    parser.add_argument("--epochs", type=_positive(int), default=20, help="epochs per run (default 20)")
    parser.add_argument("--lr", type=_positive(float), default=0.05, help="normal learning rate (default 0.05)")
    parser.add_argument("--high-lr", type=_positive(float), default=0.5,
                        help="high learning rate, where the plain network struggles (default 0.5)")
    parser.add_argument("--batch-size", type=_positive(int), default=64, help="mini-batch size (default 64)")
    parser.add_argument("--target", type=_positive(float), default=95.0,
                        help="test accuracy in %% whose first epoch the table reports (default 95)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the shuffling (default 0)")
    parser.add_argument("--out", default="xbn-demo-out", help="directory for the plot (default ./xbn-demo-out)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _import_extras() -> tuple[Any, Any, Any, Any]:
    """scikit-learn, matplotlib and tqdm, or ImportError naming the first one missing."""
    import matplotlib  # noqa: F401
    import sklearn.datasets
    import sklearn.model_selection
    import threadpoolctl  # installed with scikit-learn
    from tqdm import tqdm

    return sklearn.datasets, sklearn.model_selection, threadpoolctl, tqdm


def run(args: argparse.Namespace) -> int:
    try:
        datasets, model_selection, threadpoolctl, tqdm = _import_extras()
    except ImportError as e:
        print(f"xbn demo needs scikit-learn, matplotlib and tqdm ({e.name or e} is missing); "
              f'install them with: pip install "xbn[demo]"', file=sys.stderr)
        return 2
    try:
        backend = resolve(args.backend)
    except (BackendUnavailableError, ValueError) as e:
        print(f"xbn demo: {e}", file=sys.stderr)
        return 2

    data = load_data(datasets, model_selection, backend)
    if not 2 <= args.batch_size <= data.n_train:
        # BatchNorm needs at least two samples per batch to have a variance.
        print(f"xbn demo: --batch-size must be between 2 and {data.n_train}", file=sys.stderr)
        return 2

    runs = [
        ("no BatchNorm", False, args.lr),
        ("BatchNorm", True, args.lr),
        ("no BatchNorm", False, args.high_lr),
        ("BatchNorm", True, args.high_lr),
    ]
    print(f"digits: {data.n_train} train / {data.n_test} test images, MLP 64-{'-'.join(map(str, HIDDEN))}-10, "
          f"SGD momentum 0.9, batch {args.batch_size}, {args.epochs} epochs, "
          f"backend {backend.name}, seed {args.seed}")
    results = []
    # One CPU thread for BLAS and OpenMP: these matrices are at most 450 x 128, too small for
    # threads to pay off, and on a busy machine threaded BLAS ran this demo 8x slower. One
    # thread also makes every sum add up in the same order, so a seed gives the same numbers.
    with threadpoolctl.threadpool_limits(limits=1):
        for variant, batchnorm, lr in runs:
            name = f"{variant}, lr {lr:g}"
            net = build_mlp(batchnorm, backend=backend, seed=args.seed)
            with tqdm(total=args.epochs, desc=f"{name:<22}", unit="epoch", disable=args.quiet,
                      file=sys.stderr, leave=True) as bar:
                results.append(train(net, data, name=name, batchnorm=batchnorm, lr=lr,
                                     epochs=args.epochs, batch_size=args.batch_size, seed=args.seed,
                                     progress=bar))

    print()
    print(format_table(results, target=args.target / 100))
    print()
    print(summary(results, target=args.target / 100))
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, PLOT_NAME)
    plot(results, path, target=args.target / 100)
    print(f"\nwrote loss and accuracy curves to {path}")
    return 0


# -- data and model --------------------------------------------------------------------------

@dataclass
class Data:
    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.x_test.shape[0])


def load_data(datasets: Any, model_selection: Any, backend: Any) -> Data:
    """The 1797 digits, split 75/25 stratified by class (always the same split), on the backend.

    Inputs are standardized per pixel with the training set's mean and std. The raw 0..16 pixel
    scale would flatter BatchNorm: its first layer would be fixing badly scaled inputs, which
    any careful practitioner standardizes anyway. Standardizing gives the plain network its best
    chance, so the difference left is what BatchNorm does inside the network.
    """
    x, y = datasets.load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0)
    mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
    std[std == 0] = 1.0  # corner pixels that are blank in every training image
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    xp, dev = backend.xp, backend.device
    return Data(
        xp.asarray(x_tr.astype(np.float32), device=dev), xp.asarray(y_tr.astype(np.int64), device=dev),
        xp.asarray(x_te.astype(np.float32), device=dev), xp.asarray(y_te.astype(np.int64), device=dev),
    )


def build_mlp(batchnorm: bool, *, backend: Any, seed: int) -> Sequential:
    """Linear -> [BatchNorm1d] -> ReLU per hidden layer, then a Linear classifier.

    One NumPy Generator feeds every Linear in order and BatchNorm draws nothing, so both variants
    get the same Linear weights for a seed. The BN variant keeps the Linear biases (which BN's
    mean subtraction makes redundant) so that the two networks differ only by BatchNorm.
    """
    rng = np.random.default_rng(seed)
    layers: list[Any] = []
    sizes = (64, *HIDDEN)
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        layers.append(Linear(n_in, n_out, backend=backend, rng=rng))
        if batchnorm:
            layers.append(xbn.BatchNorm1d(n_out, backend=backend))
        layers.append(ReLU())
    layers.append(Linear(sizes[-1], 10, backend=backend, rng=rng))
    return Sequential(*layers)


# -- training --------------------------------------------------------------------------------

@dataclass
class History:
    name: str
    batchnorm: bool
    lr: float
    train_loss: list[float] = field(default_factory=list)   # mean over the epoch's mini-batches
    test_acc: list[float] = field(default_factory=list)     # after each epoch, in eval mode
    epoch_seconds: list[float] = field(default_factory=list)
    diverged_at: int | None = None                          # epoch whose loss was not finite


def train(net: Sequential, data: Data, *, name: str, batchnorm: bool, lr: float, epochs: int,
          batch_size: int, seed: int, progress: Any = None) -> History:
    xp = net[0].xp
    dev = array_api_compat.device(data.x_train)
    opt = xbn.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    # Its own Generator per run, from the same seed: every run sees the same batches in the same order.
    shuffle = np.random.default_rng([seed, 1])
    steps = data.n_train // batch_size  # drop the ragged last batch: a batch of 1 has no variance
    hist = History(name, batchnorm, lr)
    # A run that diverges overflows float32 on its way to inf/NaN; that is an expected outcome
    # here (we stop the run and report it), not something to warn about.
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for epoch in range(1, epochs + 1):
            start = time.perf_counter()
            net.train()
            order = xp.asarray(shuffle.permutation(data.n_train), device=dev)
            total = 0.0
            for i in range(steps):
                idx = order[i * batch_size:(i + 1) * batch_size]
                x, y = xp.take(data.x_train, idx, axis=0), xp.take(data.y_train, idx, axis=0)
                opt.zero_grad()
                loss, dlogits = softmax_cross_entropy(net.forward(x), y)
                net.backward(dlogits)
                opt.step()
                total = total + loss  # stays on the device; read once per epoch
            epoch_loss = float(total) / steps
            accuracy = evaluate(net, data.x_test, data.y_test)
            hist.epoch_seconds.append(time.perf_counter() - start)
            if not np.isfinite(epoch_loss):
                hist.diverged_at = epoch
                break
            hist.train_loss.append(epoch_loss)
            hist.test_acc.append(accuracy)
            if progress is not None:
                progress.set_postfix(loss=f"{epoch_loss:.4f}", test_acc=f"{accuracy:.1%}")
                progress.update()
    return hist


def evaluate(net: Sequential, x: Any, y: Any) -> float:
    """Test accuracy in eval mode: BatchNorm normalizes with its running statistics."""
    xp = net[0].xp
    logits = net.forward(x, training=False)
    return float(xp.mean(xp.astype(xp.argmax(logits, axis=1) == y, xp.float32)))


# -- reporting -------------------------------------------------------------------------------

def epochs_to(hist: History, target: float) -> int | None:
    return next((i + 1 for i, acc in enumerate(hist.test_acc) if acc >= target), None)


def format_table(results: list[History], *, target: float) -> str:
    """One row per run: final test accuracy, best train loss, epochs to ``target``, time per epoch."""
    header = ("run", "final test acc", "best train loss", f"epochs to {target:.0%}", "time/epoch")
    rows = []
    for h in results:
        if h.diverged_at is not None:
            final = f"diverged ({h.diverged_at})"
        else:
            final = f"{h.test_acc[-1]:.1%}"
        best = "-" if not h.train_loss else f"{min(h.train_loss):.4f}" if min(h.train_loss) < 1e3 else f"{min(h.train_loss):.3g}"
        reached = epochs_to(h, target)
        # The median ignores the first epoch's warm-up and the noise of a shared machine.
        per_epoch = f"{statistics.median(h.epoch_seconds) * 1e3:.1f} ms"
        rows.append((h.name, final, best, "never" if reached is None else str(reached), per_epoch))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def summary(results: list[History], *, target: float) -> str:
    """What the table says, one sentence per learning rate, computed from the numbers."""
    def final(h: History) -> str:
        if h.diverged_at is not None:
            return f"diverged in epoch {h.diverged_at}"
        acc = h.test_acc[-1]
        # Ten balanced classes: 10% is what a network that predicts one class gets.
        return f"{acc:.1%}" + (" (chance level)" if acc < 0.15 else "")

    def when(h: History) -> str:
        n = epochs_to(h, target)
        return f"never reached {target:.0%}" if n is None else f"reached {target:.0%} in epoch {n}"

    lines = []
    for plain, bn in zip(results[0::2], results[1::2]):
        lines.append(f"lr {bn.lr:g}: with BatchNorm {final(bn)}, {when(bn)}; "
                     f"without {final(plain)}, {when(plain)}.")
    return "\n".join(lines)


def plot(results: list[History], path: str, *, target: float) -> None:
    """Training loss and test accuracy per epoch for every run, written as a PNG."""
    # A bare Figure draws with the Agg canvas: no pyplot, no GUI, no global backend switch.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), dpi=110)
    ax_loss, ax_acc = fig.subplots(1, 2)
    lrs = sorted({h.lr for h in results})
    for h in results:
        epochs = range(1, len(h.train_loss) + 1)
        style = dict(color="tab:blue" if h.batchnorm else "tab:orange",
                     linestyle="-" if h.lr == lrs[0] else "--", marker="." if h.batchnorm else "x")
        label = h.name + (f" (diverged at {h.diverged_at})" if h.diverged_at else "")
        ax_loss.plot(epochs, h.train_loss, label=label, **style)
        ax_acc.plot(epochs, [100 * a for a in h.test_acc], label=label, **style)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="mean cross-entropy", yscale="log")
    ax_acc.axhline(100 * target, color="gray", linewidth=0.8, linestyle=":", label=f"target {target:.0%}")
    ax_acc.set(title="test accuracy (eval mode)", xlabel="epoch", ylabel="%", ylim=(0, 100))
    ax_acc.legend(loc="center right", fontsize="small")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle("xbn demo: the same MLP on digits, with and without BatchNorm1d")
    fig.tight_layout()
    fig.savefig(path)
