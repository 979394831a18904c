"""``xbn demo``: what BatchNorm buys, shown in seconds on a small classifier.

We train the same network on scikit-learn's bundled 8x8 digits, once plain and once with
BatchNorm, at a normal and at a high learning rate. ``--model mlp`` (the default) is a
64 -> 128 -> 128 -> 10 MLP with :class:`xbn.BatchNorm1d` after each hidden Linear layer;
``--model cnn`` is a small convnet on the 1x8x8 images, conv3x3(16) -> conv3x3(32) -> global
average pool -> Linear(10), with :class:`xbn.BatchNorm2d` after each convolution, where people
use it. Both variants start from identical weights, see the same mini-batches in the same
order, and use the same optimizer (SGD with momentum 0.9), so BatchNorm is the only difference.
The table and the plot show final test accuracy, the best training loss, how many epochs each
run needs to reach a target test accuracy, and what an epoch costs; ``--json`` writes the
timings and results for scripts.

Everything below is ordinary code you can copy: a network from :mod:`xbn.nn`, a training loop
with explicit ``forward`` / ``backward`` / ``step``, and evaluation in eval mode (BatchNorm then
uses its running statistics instead of the batch's). On ``--backend cupy`` every array lives on
the GPU; the host reads back only scalars (the loss and accuracy once per epoch, and the label
check of :func:`xbn.nn.softmax_cross_entropy` once per batch).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import array_api_compat
import numpy as np

import xbn
from xbn.backends import BackendUnavailableError, resolve
from xbn.nn import (
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    ReLU,
    Sequential,
    softmax_cross_entropy,
)

HIDDEN = (128, 128)
CHANNELS = (16, 32)
PLOT_NAME = "xbn-demo.png"
MODELS = ("mlp", "cnn")
#: per model: its description and the defaults of the options that depend on it
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "mlp": dict(title=f"MLP 64-{'-'.join(map(str, HIDDEN))}-10", epochs=20, high_lr=0.5),
    # The plain convnet still learns at 0.5 (96% after 10 epochs); at 1.0 it stays far behind
    # (36%) while the BatchNorm one reaches 98%.
    "cnn": dict(
        title=f"CNN 1x8x8 conv3x3({CHANNELS[0]})-conv3x3({CHANNELS[1]})-avgpool-10", epochs=10, high_lr=1.0
    ),
}


# -- command line ----------------------------------------------------------------------------


def _positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        value = kind(text)
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error messages
    return parse


def _seed(text: str) -> int:
    value = int(text)
    if value < 0:  # NumPy's generators take non-negative seeds only
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


_seed.__name__ = "int"


def _percent(text: str) -> float:
    value = float(text)
    if not 0 < value <= 100:
        raise argparse.ArgumentTypeError(f"must be in (0, 100], got {text}")
    return value


_percent.__name__ = "float"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        choices=MODELS,
        default="mlp",
        help="mlp (default): BatchNorm1d in an MLP; cnn: BatchNorm2d in a small convnet",
    )
    parser.add_argument(
        "--backend",
        default="numpy",
        help='array backend: numpy (default), torch, array_api_strict, or "cupy" on a GPU',
    )
    parser.add_argument(
        "--epochs",
        type=_positive(int),
        default=None,
        help="epochs per run (default 20 for the MLP, 10 for the CNN)",
    )
    parser.add_argument(
        "--lr", type=_positive(float), default=0.05, help="normal learning rate (default 0.05)"
    )
    parser.add_argument(
        "--high-lr",
        type=_positive(float),
        default=None,
        help="high learning rate, where the plain network struggles "
        "(default 0.5 for the MLP, 1.0 for the CNN)",
    )
    parser.add_argument("--batch-size", type=_positive(int), default=64, help="mini-batch size (default 64)")
    parser.add_argument(
        "--target",
        type=_percent,
        default=95.0,
        help="test accuracy in %% whose first epoch the table reports (default 95)",
    )
    parser.add_argument(
        "--seed", type=_seed, default=0, help="seed of the initial weights and the shuffling (default 0)"
    )
    parser.add_argument(
        "--out", default="xbn-demo-out", help="directory for the plot (default ./xbn-demo-out)"
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        default=None,
        help="also write the results, with every run's seconds per epoch, as JSON to PATH",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def _import_extras() -> tuple[Any, Any, Any, Any]:
    """scikit-learn, matplotlib and tqdm, or ImportError naming the first one missing."""
    import matplotlib  # noqa: F401
    import sklearn.datasets
    import sklearn.model_selection
    import threadpoolctl  # installed with scikit-learn
    from tqdm import tqdm

    return sklearn.datasets, sklearn.model_selection, threadpoolctl, tqdm


def _fail(message: str) -> int:
    print(f"xbn demo: {message}", file=sys.stderr)
    return 2


def check_outputs(out_dir: str, json_path: str | None) -> str | None:
    """Create ``out_dir`` and prove both outputs writable, before any training; the error or None.

    A probe file is written and removed rather than trusting os.access, which says yes to root
    on a read-only file system.
    """
    try:
        os.makedirs(out_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".xbn-demo-probe-"):
            pass
    except OSError as e:
        return f"cannot write to --out {out_dir!r}: {e.strerror or e}"
    if json_path is not None:
        if os.path.isdir(json_path):
            return f"--json {json_path!r} is a directory; expected a file path"
        parent = os.path.dirname(json_path) or "."
        try:
            os.makedirs(parent, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=parent, prefix=".xbn-demo-probe-"):
                pass
            if os.path.exists(json_path) and not os.access(json_path, os.W_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            return f"cannot write --json {json_path!r}: {e.strerror or e}"
    return None


@contextlib.contextmanager
def one_cpu_thread(threadpoolctl: Any, backend: Any) -> Iterator[None]:
    """BLAS, OpenMP and xbn's compiled NumPy engine on one thread, restored afterwards.

    These arrays are at most 450 x 32 x 8 x 8, too small for threads to pay off: on a busy
    2-core machine threaded BLAS ran the MLP demo 8x slower, and BatchNorm2d's compiled loops
    on two threads took 60 ms for a forward and backward that takes 0.75 ms on one. One thread
    also makes every sum add up in the same order, so a seed gives the same numbers.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(threadpoolctl.threadpool_limits(limits=1))
        if backend.name == "numpy":
            from xbn.kernels import numpy as engine

            stack.callback(engine.set_num_threads, engine.get_num_threads())
            engine.set_num_threads(1)
        yield


def run(args: argparse.Namespace) -> int:
    try:
        datasets, model_selection, threadpoolctl, tqdm = _import_extras()
    except ImportError as e:
        print(
            f"xbn demo needs scikit-learn, matplotlib and tqdm ({e.name or e} is missing); "
            f'install them with: pip install "xbn[demo]"',
            file=sys.stderr,
        )
        return 2
    try:
        backend = resolve(args.backend)
    except (BackendUnavailableError, ValueError) as e:
        return _fail(str(e))
    model = MODEL_DEFAULTS[args.model]
    epochs = model["epochs"] if args.epochs is None else args.epochs
    high_lr = model["high_lr"] if args.high_lr is None else args.high_lr

    data = load_data(datasets, model_selection, backend, images=args.model == "cnn")
    if not 2 <= args.batch_size <= data.n_train:
        # BatchNorm needs at least two samples per batch to have a variance.
        return _fail(f"--batch-size must be between 2 and {data.n_train}, got {args.batch_size}")
    problem = check_outputs(args.out, args.json)
    if problem is not None:
        return _fail(problem)

    runs = [
        ("no BatchNorm", False, args.lr),
        ("BatchNorm", True, args.lr),
        ("no BatchNorm", False, high_lr),
        ("BatchNorm", True, high_lr),
    ]
    print(
        f"digits: {data.n_train} train / {data.n_test} test images, {model['title']}, "
        f"SGD momentum 0.9, batch {args.batch_size}, {epochs} epochs, "
        f"backend {backend.name}, seed {args.seed}"
    )
    results = []
    with one_cpu_thread(threadpoolctl, backend):
        for variant, batchnorm, lr in runs:
            name = f"{variant}, lr {lr:g}"
            net = build_model(args.model, batchnorm, backend=backend, seed=args.seed)
            with tqdm(
                total=epochs,
                desc=f"{name:<22}",
                unit="epoch",
                disable=args.quiet,
                file=sys.stderr,
                leave=True,
            ) as bar:
                hist = train(
                    net,
                    data,
                    name=name,
                    batchnorm=batchnorm,
                    lr=lr,
                    epochs=epochs,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    progress=bar,
                )
            if batchnorm and hist.diverged_at is None and hasattr(xbn, "fold_batchnorm"):
                hist.folded = compare_folded(net, data)
            results.append(hist)

    target = args.target / 100
    print()
    print(format_table(results, target=target))
    print()
    print(summary(results, target=target))
    folded = format_folded(results)
    if folded:
        print()
        print(folded)
    path = os.path.join(args.out, PLOT_NAME)
    try:
        plot(results, path, target=target, model=args.model)
        if args.json is not None:
            write_json(
                args.json,
                results,
                model=args.model,
                backend=backend,
                epochs=epochs,
                batch_size=args.batch_size,
                seed=args.seed,
                target=target,
            )
    except OSError as e:
        print(f"xbn demo: cannot write {e.filename or 'the results'}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"\nwrote loss and accuracy curves to {path}")
    if args.json is not None:
        print(f"wrote results and seconds per epoch to {args.json}")
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


def load_data(datasets: Any, model_selection: Any, backend: Any, *, images: bool = False) -> Data:
    """The 1797 digits, split 75/25 stratified by class (always the same split), on the backend.

    Inputs are standardized with the training set's statistics. The raw 0..16 pixel scale would
    flatter BatchNorm: its first layer would be fixing badly scaled inputs, which any careful
    practitioner standardizes anyway. Standardizing gives the plain network its best chance, so
    the difference left is what BatchNorm does inside the network.

    As vectors (the MLP's input), each pixel gets its own mean and std. As ``images`` (N, 1, 8, 8)
    for the convnet, one mean and std over all pixels, as image pipelines normalize per channel:
    a convolution slides one filter over every position, which per-pixel scales would distort.
    """
    x, y = datasets.load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=0.25, stratify=y, random_state=0
    )
    if images:
        mean, std = x_tr.mean(), x_tr.std()
        x_tr, x_te = ((x_tr - mean) / std).reshape(-1, 1, 8, 8), ((x_te - mean) / std).reshape(-1, 1, 8, 8)
    else:
        mean, std = x_tr.mean(axis=0), x_tr.std(axis=0)
        std[std == 0] = 1.0  # corner pixels that are blank in every training image
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    xp, dev = backend.xp, backend.device
    return Data(
        xp.asarray(x_tr.astype(np.float32), device=dev),
        xp.asarray(y_tr.astype(np.int64), device=dev),
        xp.asarray(x_te.astype(np.float32), device=dev),
        xp.asarray(y_te.astype(np.int64), device=dev),
    )


def build_model(model: str, batchnorm: bool, *, backend: Any, seed: int) -> Sequential:
    """The demo's ``model`` ("mlp" or "cnn"), with or without BatchNorm."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    return (build_mlp if model == "mlp" else build_cnn)(batchnorm, backend=backend, seed=seed)


def build_mlp(batchnorm: bool, *, backend: Any, seed: int) -> Sequential:
    """Linear -> [BatchNorm1d] -> ReLU per hidden layer, then a Linear classifier.

    One NumPy Generator feeds every Linear in order and BatchNorm draws nothing, so both variants
    get the same Linear weights for a seed. The BN variant keeps the Linear biases (which BN's
    mean subtraction makes redundant) so that the two networks differ only by BatchNorm.
    """
    rng = np.random.default_rng(seed)
    layers: list[Any] = []
    sizes = (64, *HIDDEN)
    for n_in, n_out in itertools.pairwise(sizes):
        layers.append(Linear(n_in, n_out, backend=backend, rng=rng))
        if batchnorm:
            layers.append(xbn.BatchNorm1d(n_out, backend=backend))
        layers.append(ReLU())
    layers.append(Linear(sizes[-1], 10, backend=backend, rng=rng))
    return Sequential(*layers)


def build_cnn(batchnorm: bool, *, backend: Any, seed: int) -> Sequential:
    """Conv2d(3x3, padding 1) -> [BatchNorm2d] -> ReLU per block, global average pool, Linear.

    As in :func:`build_mlp`: one Generator feeds every weight in order, so both variants start
    from the same weights, and the convolutions keep their biases in the BN variant.
    """
    rng = np.random.default_rng(seed)
    layers: list[Any] = []
    sizes = (1, *CHANNELS)
    for c_in, c_out in itertools.pairwise(sizes):
        layers.append(Conv2d(c_in, c_out, 3, padding=1, backend=backend, rng=rng))
        if batchnorm:
            layers.append(xbn.BatchNorm2d(c_out, backend=backend))
        layers.append(ReLU())
    layers += [GlobalAvgPool2d(), Flatten(), Linear(sizes[-1], 10, backend=backend, rng=rng)]
    return Sequential(*layers)


# -- training --------------------------------------------------------------------------------


@dataclass
class History:
    name: str
    batchnorm: bool
    lr: float
    train_loss: list[float] = field(default_factory=list)  # mean over the epoch's mini-batches
    test_acc: list[float] = field(default_factory=list)  # after each epoch, in eval mode
    epoch_seconds: list[float] = field(default_factory=list)
    diverged_at: int | None = None  # epoch whose loss was not finite
    folded: Folded | None = None  # BatchNorm folded for inference


def train(
    net: Sequential,
    data: Data,
    *,
    name: str,
    batchnorm: bool,
    lr: float,
    epochs: int,
    batch_size: int,
    seed: int,
    progress: Any = None,
) -> History:
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
                idx = order[i * batch_size : (i + 1) * batch_size]
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


def evaluate(net: xbn.Module, x: Any, y: Any) -> float:
    """Test accuracy in eval mode: BatchNorm normalizes with its running statistics."""
    xp = array_api_compat.array_namespace(x)
    logits = net.forward(x, training=False)
    return float(xp.mean(xp.astype(xp.argmax(logits, axis=1) == y, xp.float32)))


@dataclass
class Folded:
    """The trained BN network against its copy with BatchNorm folded into the layer before it."""

    test_acc: float  # the network as trained, in eval mode
    folded_test_acc: float  # the folded copy
    eval_seconds: float  # one evaluation of the test set (the fastest of several)
    folded_eval_seconds: float


def compare_folded(net: Sequential, data: Data, *, repeats: int = 7) -> Folded:
    """Fold each BatchNorm of the trained ``net`` into the layer before it (``xbn.fold_batchnorm``)
    and compare test accuracy and the time of an evaluation.

    In eval mode a BatchNorm is a fixed per-channel affine map, so the folded network computes
    the same function with one pass less per BatchNorm; the accuracies agree up to float32
    rounding of a logit on a decision boundary. Each time includes reading the accuracy back,
    which waits for a GPU to finish. The two networks take turns and each keeps its fastest
    time: on a shared machine the noise only ever adds time, and taking turns spreads any slow
    stretch over both.
    """
    models = [net.eval(), xbn.fold_batchnorm(net.eval())]
    accs = [evaluate(m, data.x_test, data.y_test) for m in models]  # warm-up: first calls compile
    best = [math.inf, math.inf]
    for _ in range(repeats):
        for i, m in enumerate(models):
            start = time.perf_counter()
            accs[i] = evaluate(m, data.x_test, data.y_test)
            best[i] = min(best[i], time.perf_counter() - start)
    return Folded(accs[0], accs[1], best[0], best[1])


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
        if not h.train_loss:
            best = "-"
        else:
            best = f"{min(h.train_loss):.4f}" if min(h.train_loss) < 1e3 else f"{min(h.train_loss):.3g}"
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
        lines.append(
            f"lr {bn.lr:g}: with BatchNorm {final(bn)}, {when(bn)}; without {final(plain)}, {when(plain)}."
        )
    return "\n".join(lines)


def write_json(
    path: str,
    results: list[History],
    *,
    model: str,
    backend: Any,
    epochs: int,
    batch_size: int,
    seed: int,
    target: float,
) -> None:
    """The runs' results and seconds per epoch, as JSON (for scripts and the GPU tier's summary).

    ``median_epoch_seconds`` leaves out each run's first epoch, which pays for warm-up (kernel
    compilation on a GPU, first-touch allocations) and is not what an epoch costs; with a single
    epoch per run it is that epoch.
    """

    def steady(seconds: list[float]) -> list[float]:
        return seconds[1:] or seconds

    runs = []
    for h in results:
        runs.append(
            {
                "name": h.name,
                "batchnorm": h.batchnorm,
                "lr": h.lr,
                "epoch_seconds": h.epoch_seconds,
                "median_epoch_seconds": statistics.median(steady(h.epoch_seconds)),
                "final_test_acc": h.test_acc[-1] if h.diverged_at is None and h.test_acc else None,
                "best_train_loss": min(h.train_loss) if h.train_loss else None,
                "epochs_to_target": epochs_to(h, target),
                "diverged_at": h.diverged_at,
                "folded": None if h.folded is None else dataclasses.asdict(h.folded),
            }
        )
    doc = {
        "model": model,
        "title": MODEL_DEFAULTS[model]["title"],
        "backend": backend.name,
        "device": str(backend.device),
        "epochs": epochs,
        "batch_size": batch_size,
        "seed": seed,
        "target": target,
        "median_epoch_seconds": statistics.median([s for h in results for s in steady(h.epoch_seconds)]),
        "runs": runs,
    }
    with open(path, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")


def format_folded(results: list[History]) -> str:
    """One line per BatchNorm run whose network was folded: test accuracy and evaluation time."""
    lines = []
    for h in results:
        f = h.folded
        if f is None:
            continue
        lines.append(
            f"{h.name}: test accuracy {f.test_acc:.1%} -> {f.folded_test_acc:.1%}, "
            f"evaluation {f.eval_seconds * 1e3:.1f} ms -> {f.folded_eval_seconds * 1e3:.1f} ms "
            f"({f.eval_seconds / f.folded_eval_seconds:.2f}x)"
        )
    if not lines:
        return ""
    title = "BatchNorm folded into the layer before it for inference (xbn.fold_batchnorm):"
    return "\n".join([title, *lines])


def plot(results: list[History], path: str, *, target: float, model: str = "mlp") -> None:
    """Training loss and test accuracy per epoch for every run, written as a PNG."""
    # A bare Figure draws with the Agg canvas: no pyplot, no GUI, no global backend switch.
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), dpi=110)
    ax_loss, ax_acc = fig.subplots(1, 2)
    lrs = sorted({h.lr for h in results})
    for h in results:
        epochs = range(1, len(h.train_loss) + 1)
        style = dict(
            color="tab:blue" if h.batchnorm else "tab:orange",
            linestyle="-" if h.lr == lrs[0] else "--",
            marker="." if h.batchnorm else "x",
        )
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
    layer = "BatchNorm1d" if model == "mlp" else "BatchNorm2d"
    fig.suptitle(f"xbn demo: the same {model.upper()} on digits, with and without {layer}")
    fig.tight_layout()
    fig.savefig(path)
