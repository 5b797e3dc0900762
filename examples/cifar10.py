r"""Tune weight decay, label smoothing and augmentation of a ResNet-20 on
CIFAR-10 with T1–T2.

The model is the CIFAR ResNet-20 of He et al. (2016, §4.2): a 3×3 stem,
three stages of three basic blocks with 16, 32 and 64 channels (stride 2 at
the start of stages 2 and 3, parameter-free "option A" shortcuts that
subsample and zero-pad the channels), global average pooling and a 10-way
linear layer; written with ``flax.linen``, so its parameters are an ordinary
pytree handed to gradhpo as ``params``.

**Normalisation.** The hypergradient machinery needs a pure
``loss(params, hyperparams, batch) -> scalar``; batch normalisation's
running averages are mutable state outside that signature. This example
therefore uses GroupNorm (Wu & He 2018; groups of at most 8 channels) in
place of BatchNorm: it has no running statistics, behaves identically in
training and evaluation, and a prediction does not depend on the other
images of its batch. (Accuracy is close to, but not the same as, the
BatchNorm ResNet-20's 91.25 % of the paper.)

**Hyperparameters** :math:`\lambda`, all unconstrained reals:

- ``log_wd``: weight decay :math:`\exp(\lambda_{wd})`, applied by the inner
  optimizer, ``optax.add_decayed_weights`` before SGD with momentum 0.9 on
  the convolution and dense kernels (the L2-coupled decay of He et al.; a
  callable inner optimizer ``hp -> optax transformation``, so the decay is a
  differentiable optimizer hyperparameter);
- ``ls_logit``: label smoothing :math:`\epsilon = 0.5\,\sigma(\lambda_{ls})
  \in (0, 0.5)`, through ``optax.smooth_labels`` in the training loss;
- ``aug_logit``: augmentation magnitude :math:`m = \sigma(\lambda_{aug})
  \in (0, 1)`: a random translation by up to :math:`4m` pixels (bilinear,
  the standard pad-4 crop made continuous) plus Gaussian pixel noise of
  standard deviation :math:`0.25m` (in standardised units), after a random
  horizontal flip that is not tuned. The random directions, noise and flips
  are drawn on the host and carried in the training batch, so the inner
  step and its vector-Jacobian product use the same draw (ALGORITHMS.md
  §1.7, pitfall 7); see ``examples/augmentation.py``.

The validation loss is the plain cross-entropy of un-augmented validation
images, so every hypergradient is indirect (through the inner step).

The script trains twice from the same initial weights, data order and noise:
once with the hyperparameters fixed at their initial values (plain SGD
steps) and once tuned by T1–T2 (Adam on :math:`\lambda`), then prints a
table (validation loss, test accuracy, hyperparameters, gradient
evaluations, wall time) and saves ``val_loss.png``, ``hyperparameters.png``
and ``results.json`` in ``--out``.

Both runs take ``--steps`` inner steps, and each row is charged its own
cost in gradient evaluations G (one forward and backward pass of the
training loss on one training batch): the untuned run 1 G per plain step;
the T1–T2 run what gradhpo counts (``state.metadata["grad_evals"]``,
documented in ``gradhpo.utils.cost``), 4 G per step here (the training
gradient, the validation gradient on a batch of the same size, and a
second-order product counted as 2 G). The untuned run is a reference at
the same number of steps, not a baseline at the same budget.

Data: ``--data-dir`` is the ``cifar-10-batches-py`` directory of the CIFAR-10
*python version* (https://www.cs.toronto.edu/~kriz/cifar.html,
``cifar-10-python.tar.gz``), or its parent; ``download_cifar10(dir)`` of
the examples' support module ``data_utils.py`` downloads and extracts it
with an md5 check. ``--quick`` (for tests) writes a few hundred generated
images in the same python-batch format under ``--out`` and trains a narrow
ResNet for a few steps. A GPU is recommended for real runs: on a CPU a
full-width T1–T2 step at batch size 128 takes seconds.

Examples::

    python examples/cifar10.py --quick
    python examples/cifar10.py --data-dir ~/data/cifar-10-batches-py
    python examples/cifar10.py --data-dir ~/data --steps 20000 --out runs/c10
"""

import argparse
import math
import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cli import (add_common_flags, fill_defaults, float_in,  # noqa: E402
                 legend_below, method_colours, nonnegative_int,
                 open_fraction, positive_float, positive_int, progress,
                 pyplot, quick_help, saved_line, verdict, write_json)

MAX_SMOOTHING = 0.5


#: Defaults of the flags that --quick changes (their parser default is None,
#: so that a flag given explicitly wins). The short --quick run needs a
#: larger --outer-lr for a visible hyperparameter step.
NORMAL = dict(steps=5000, eval_every=250, eval_size=1000, batch_size=128,
              width=16, max_train=0, outer_lr=0.01)
QUICK = dict(steps=6, eval_every=3, eval_size=0, batch_size=16, width=4,
             max_train=256, outer_lr=0.05)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Needs the CIFAR-10 python batches (--data-dir) unless "
               "--quick.")
    p.add_argument("--data-dir", help="cifar-10-batches-py or its parent")
    p.add_argument("--steps", type=positive_int,
                   help=f"inner steps of each run (default {NORMAL['steps']})")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"default {NORMAL['batch_size']}")
    p.add_argument("--lr", type=positive_float, default=0.1,
                   help="peak SGD learning rate (cosine decay, momentum 0.9)")
    p.add_argument("--outer-lr", type=positive_float,
                   help="Adam learning rate of the hyperparameters (default "
                   f"{NORMAL['outer_lr']})")
    p.add_argument("--init-wd", type=positive_float, default=5e-4,
                   help="initial weight decay (> 0: it is log-parametrised)")
    p.add_argument("--init-smoothing", default=0.05,
                   type=float_in(0.0, MAX_SMOOTHING, low_open=True,
                                 high_open=True),
                   help=f"initial label smoothing, in (0, {MAX_SMOOTHING})")
    p.add_argument("--init-magnitude", type=open_fraction, default=0.5,
                   help="initial augmentation magnitude, in (0, 1)")
    p.add_argument("--width", type=positive_int,
                   help="channels of the first stage (default and ResNet-20: "
                   f"{NORMAL['width']})")
    p.add_argument("--blocks", type=positive_int, default=3,
                   help="basic blocks per stage (ResNet-20: 3)")
    p.add_argument("--max-train", type=nonnegative_int,
                   help="use at most this many training images (0: all; "
                   "default 0)")
    p.add_argument("--eval-every", type=positive_int,
                   help=f"default {NORMAL['eval_every']}")
    p.add_argument("--eval-size", type=nonnegative_int,
                   help="validation images for the curve (0: all; the "
                   f"final row uses them all; default {NORMAL['eval_size']})")
    add_common_flags(p, out="runs/cifar10",
                     quick=quick_help("generated CIFAR-format data (unless "
                                      "--data-dir), a narrow ResNet and a "
                                      "few steps (for tests)", NORMAL,
                                      QUICK))
    args = fill_defaults(p.parse_args(argv), NORMAL, QUICK)
    return args


if __name__ == "__main__":
    parse_args()    # --help and usage errors before JAX loads

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gradhpo as gh  # noqa: E402

import data_utils  # noqa: E402  (the examples' data loaders)
from augmentation import augment  # noqa: E402  (the sibling example)

MAX_SHIFT = 4.0     # pixels at m = 1: the standard pad-4 random crop
MAX_NOISE = 0.25    # pixel-noise std at m = 1, standardised units
NO_DATA = """\
CIFAR-10 is needed: pass --data-dir with the CIFAR-10 python batches
(data_batch_1 ... data_batch_5, test_batch), i.e. the directory
cifar-10-batches-py extracted from cifar-10-python.tar.gz
(https://www.cs.toronto.edu/~kriz/cifar.html), or its parent. To fetch it
with an md5 check (from the repository's root):

    PYTHONPATH=examples python -c "import data_utils; \\
data_utils.download_cifar10('data')"

then run with --data-dir data. Or run with --quick for a small generated
stand-in (a smoke test, not CIFAR-10)."""


# -- ResNet-20 ----------------------------------------------------------------

def norm(channels, scale_init=nn.initializers.ones):
    """GroupNorm with groups of at most 8 channels (no running state)."""
    return nn.GroupNorm(num_groups=None, group_size=math.gcd(channels, 8),
                        scale_init=scale_init)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a parameter-free (option A) shortcut."""
    channels: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        conv = lambda s: nn.Conv(  # noqa: E731
            self.channels, (3, 3), strides=s, padding=1, use_bias=False)
        y = nn.relu(norm(self.channels)(conv(self.stride)(x)))
        # Zero-initialised last scale (Goyal et al. 2017): every block starts
        # as the identity, which keeps the initial logits small and SGD at
        # learning rate 0.1 stable without BatchNorm.
        y = norm(self.channels, nn.initializers.zeros)(conv(1)(y))
        if self.stride > 1 or x.shape[-1] != self.channels:
            # He et al. option A: subsample, then zero-pad the new channels.
            x = x[:, ::self.stride, ::self.stride, :]
            extra = self.channels - x.shape[-1]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0),
                            (extra // 2, extra - extra // 2)))
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2): ``blocks = n`` per stage (ResNet-20: n = 3)."""
    width: int = 16
    blocks: int = 3
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False)(x)
        x = nn.relu(norm(self.width)(x))
        for stage in range(3):
            channels = self.width * 2 ** stage
            for block in range(self.blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(channels, stride)(x)
        return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


# -- losses and the inner optimizer -------------------------------------------

def decay_mask(params):
    """Weight decay on convolution and dense kernels only."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)


def hyperparameter_values(hp):
    """The constrained values ``(weight decay, smoothing, magnitude)``."""
    return (jnp.exp(hp["log_wd"]),
            MAX_SMOOTHING * jax.nn.sigmoid(hp["ls_logit"]),
            jax.nn.sigmoid(hp["aug_logit"]))


def make_problem(model, lr, steps):
    """``train_loss``, ``val_loss`` and the callable inner optimizer."""
    def train_loss(params, hp, batch):
        _, smoothing, m = hyperparameter_values(hp)
        x = augment(batch["x"], m * MAX_SHIFT, m * MAX_NOISE,
                    batch["shift"], batch["pixel"])
        logits = model.apply({"params": params}, x)
        targets = optax.smooth_labels(
            jax.nn.one_hot(batch["y"], logits.shape[-1]), smoothing)
        return optax.softmax_cross_entropy(logits, targets).mean()

    def val_loss(params, hp, batch):
        del hp
        logits = model.apply({"params": params}, batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, batch["y"]).mean()

    schedule = optax.cosine_decay_schedule(lr, max(1, steps), alpha=0.01)

    def inner_optimizer(hp):
        return optax.chain(
            optax.add_decayed_weights(jnp.exp(hp["log_wd"]), decay_mask),
            optax.sgd(schedule, momentum=0.9))

    return train_loss, val_loss, inner_optimizer


# -- data ---------------------------------------------------------------------

def write_fake_cifar10(directory, per_batch=60, n_test=100, seed=0):
    """Writes generated images in the CIFAR-10 python-batch format.

    Each class is a coloured, oriented stripe pattern with noise, so a small
    network can learn it in a few steps. Files: ``data_batch_1`` …
    ``data_batch_5`` (``per_batch`` images each) and ``test_batch``, each a
    pickled dict with ``b"data"`` (uint8, ``(N, 3072)``, R, G, B planes) and
    ``b"labels"`` (list of ints), as in the real archive.

    Returns:
      ``directory``.
    """
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    rows, cols = np.mgrid[0:32, 0:32]
    colours = rng.uniform(0.2, 1.0, (10, 3))

    def images(n):
        labels = rng.integers(0, 10, n)
        angle = labels[:, None, None] * np.pi / 10
        phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
        wave = 0.5 + 0.5 * np.sin(
            (np.cos(angle) * rows + np.sin(angle) * cols) * 0.6 + phase)
        x = wave[..., None] * colours[labels][:, None, None, :]
        x = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
        data = (x * 255).astype(np.uint8).transpose(0, 3, 1, 2)
        return {b"data": data.reshape(n, 3072),
                b"labels": [int(c) for c in labels]}

    names = list(data_utils.CIFAR10_TRAIN_BATCHES) + [
        data_utils.CIFAR10_TEST_BATCH]
    for name in names:
        n = n_test if name == data_utils.CIFAR10_TEST_BATCH else per_batch
        with open(os.path.join(directory, name), "wb") as f:
            pickle.dump(images(n), f, protocol=2)
    return directory


def load(data_dir, seed, max_train=0, val_fraction=0.1):
    """Per-channel standardised float32 NHWC splits (train statistics)."""
    splits = data_utils.load_cifar10_splits(
        data_dir, val_fraction=val_fraction, seed=seed)
    print(splits.source)
    (xtr, ytr), (xva, yva), (xte, yte) = splits.train, splits.val, splits.test
    if max_train:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    # standardize() works per feature over axis 0: viewing the images as
    # (pixels, 3) rows gives per-channel statistics.
    flat = [x.reshape(-1, 3).astype(np.float32) / 255 for x in (xtr, xva, xte)]
    flat = data_utils.standardize(*flat)
    # Kept on the host (numpy): batches are gathered and flipped there.
    return [(f.reshape(x.shape), y.astype(np.int32))
            for f, x, y in zip(flat, (xtr, xva, xte), (ytr, yva, yte))]


def train_batch(train, args, step):
    """Images, labels, flips and the augmentation noise of one step, a pure
    function of (seed, step): both runs see the same data and noise."""
    rng = np.random.default_rng([args.seed, 0, step])
    idx = rng.integers(0, len(train[1]), args.batch_size)
    x = train[0][idx]
    flip = rng.random(args.batch_size) < 0.5
    x[flip] = x[flip, :, ::-1]
    return {"x": x, "y": train[1][idx],
            "shift": rng.uniform(-1, 1, (args.batch_size, 2)
                                 ).astype(np.float32),
            "pixel": rng.standard_normal(x.shape).astype(np.float32)}


def val_batch(val, args, step):
    rng = np.random.default_rng([args.seed, 1, step])
    idx = rng.integers(0, len(val[1]), args.batch_size)
    return {"x": val[0][idx], "y": val[1][idx]}


def make_evaluate(model, chunk):
    """Mean cross-entropy and accuracy over a split, in fixed-size chunks
    (one compilation; the remainder beyond a whole chunk is dropped)."""
    @jax.jit
    def chunk_stats(params, x, y):
        logits = model.apply({"params": params}, x)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return ce.sum(), (jnp.argmax(logits, -1) == y).sum()

    def evaluate(params, data, limit=0):
        x, y = data
        n = min(len(y), limit) if limit else len(y)
        size = min(chunk, n)
        totals = np.zeros(2)
        count = 0
        for start in range(0, n - size + 1, size):
            totals += np.asarray(chunk_stats(
                params, x[start:start + size], y[start:start + size]))
            count += size
        return totals[0] / count, totals[1] / count

    return evaluate


# -- the runs -----------------------------------------------------------------

def describe(hp):
    wd, ls, m = (float(v) for v in hyperparameter_values(hp))
    return {"weight_decay": wd, "label_smoothing": ls, "aug_magnitude": m}


def run(name, params, hp, data, args, problem, evaluate):
    """Trains with hyperparameters tuned by T1–T2, or fixed (``untuned``:
    plain SGD steps, one gradient evaluation each)."""
    train_loss, val_loss, inner_optimizer = problem
    train, val, _ = data
    if name == "T1-T2":
        opt = gh.T1T2(train_loss, val_loss, inner_optimizer,
                      optax.adam(args.outer_lr))
        state = opt.init(params, hp)

        def step(state, i):
            return opt.step(state, train_batch(train, args, i),
                            val_batch(val, args, i))
        current = lambda s: (s.params, s.hyperparams)  # noqa: E731
        # what the library counted (a host read, made only at evaluations)
        spent = lambda s, i: float(s.metadata["grad_evals"])  # noqa: E731
    else:
        tx = inner_optimizer(hp)

        @jax.jit
        def plain(params, opt_state, batch):
            grads = jax.grad(train_loss)(params, hp, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state
        state = (params, tx.init(params))

        def step(state, i):
            return plain(*state, train_batch(train, args, i))
        current = lambda s: (s[0], hp)  # noqa: E731
        # 1 G a plain step
        spent = lambda s, i: float(i)  # noqa: E731
    p, h = current(state)          # the initial point: 0 steps, 0 G
    curve = [{"step": 0, "val_loss": float(evaluate(p, val,
                                                    args.eval_size)[0]),
              "grad_evals": 0.0, **describe(h)}]
    start = time.perf_counter()
    bar = progress(range(args.steps), desc=name, leave=False)
    for i in bar:
        state = step(state, i)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            p, h = current(state)
            loss, _ = evaluate(p, val, args.eval_size)
            curve.append({"step": i + 1, "val_loss": float(loss),
                          "grad_evals": spent(state, i + 1), **describe(h)})
            bar.set_postfix(val_loss=f"{loss:.3f}")
    seconds = time.perf_counter() - start
    p, h = current(state)
    vloss, _ = evaluate(p, val)
    _, acc = evaluate(p, data[2])
    row = {"method": name, "val_loss": float(vloss), "test_acc": float(acc),
           "grad_evals": spent(state, args.steps),
           "seconds": seconds, **describe(h)}
    return row, curve


# -- main ---------------------------------------------------------------------

def initial_hyperparams(args):
    logit = lambda p: float(np.log(p / (1 - p)))  # noqa: E731
    return {"log_wd": jnp.array(math.log(args.init_wd), jnp.float32),
            "ls_logit": jnp.array(logit(args.init_smoothing / MAX_SMOOTHING),
                                  jnp.float32),
            "aug_logit": jnp.array(logit(args.init_magnitude), jnp.float32)}


def main(argv=None):
    args = parse_args(argv)
    if not args.data_dir and not args.quick:
        print(NO_DATA, file=sys.stderr)
        raise SystemExit(2)
    os.makedirs(args.out, exist_ok=True)
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = write_fake_cifar10(
            os.path.join(args.out, "generated-cifar-10-batches-py"),
            seed=args.seed)
        print(f"--quick: generated CIFAR-format images in {data_dir} "
              "(not CIFAR-10)")
    data = load(data_dir, args.seed, args.max_train)
    model = ResNet(width=args.width, blocks=args.blocks)
    params = model.init(jax.random.PRNGKey(args.seed),
                        data[0][0][:1])["params"]
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"ResNet-{6 * args.blocks + 2}, width {args.width}: {n_params:,} "
          f"parameters")
    problem = make_problem(model, args.lr, args.steps)
    evaluate = make_evaluate(model, chunk=min(500, len(data[1][1])))
    hp = initial_hyperparams(args)
    rows, curves = [], {}
    for name in ("untuned", "T1-T2"):
        row, curves[name] = run(name, params, hp, data, args, problem,
                                evaluate)
        rows.append(row)
    print_table(rows)
    print("grad evals: untuned 1 G per plain step; T1-T2 as counted by "
          "gradhpo (same number of steps, not the same budget)")
    write_json(os.path.join(args.out, "results.json"),
               {"args": vars(args), "data_dir": str(data_dir),
                "initial": describe(hp), "rows": rows, "curves": curves},
               indent=1)
    title = (f"ResNet-{6 * args.blocks + 2} on "
             + ("CIFAR-10" if args.data_dir else
                "generated CIFAR-format images (not CIFAR-10)"))
    plot(curves, args.out, title)
    print(saved_line(args.out, ["results.json", *PLOTS]))
    print(verdict(rows, "test_acc", "test accuracy", baselines=("untuned",)))
    return rows


def print_table(rows):
    print(f"{'run':<8} {'val loss':>9} {'test acc':>9} {'weight decay':>13} "
          f"{'smoothing':>10} {'aug m':>7} {'grad evals':>11} {'time [s]':>9}")
    for r in rows:
        print(f"{r['method']:<8} {r['val_loss']:>9.4f} {r['test_acc']:>9.3f} "
              f"{r['weight_decay']:>13.2e} {r['label_smoothing']:>10.4f} "
              f"{r['aug_magnitude']:>7.3f} {r['grad_evals']:>11.0f} "
              f"{r['seconds']:>9.1f}")


PLOTS = ("val_loss.png", "hyperparameters.png")
#: One colour per run, the same in both plots.
COLOURS = method_colours(["T1-T2"], ["untuned"])


def plot(curves, out, title="ResNet"):
    """val_loss.png (against gradient evaluations) and hyperparameters.png
    (against inner steps), every curve from 0 and each run in one colour;
    each line's ``gid`` is its run. Returns ``{file name: figure}``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    for name, curve in curves.items():
        ax.plot([c["grad_evals"] for c in curve],
                [c["val_loss"] for c in curve], marker=".",
                color=COLOURS[name], gid=name,
                label="untuned (initial hyperparameters, plain SGD)"
                if name == "untuned" else f"{name} (tuned)")
    ax.set(xlabel="gradient evaluations (G)", ylabel="validation loss",
           title=f"{title}: validation loss")
    ax.grid(alpha=0.3)
    legend_below(fig, ncol=2)
    fig.savefig(os.path.join(out, PLOTS[0]), dpi=120)
    figures = {PLOTS[0]: fig}
    keys = (("weight_decay", "weight decay", "log"),
            ("label_smoothing", "label smoothing", "linear"),
            ("aug_magnitude", "augmentation magnitude", "linear"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), layout="constrained")
    for ax, (key, label, scale) in zip(axes, keys):
        for name, curve in curves.items():
            ax.plot([c["step"] for c in curve], [c[key] for c in curve],
                    color=COLOURS[name], gid=name, label=(
                        "untuned (initial hyperparameters, plain SGD)"
                        if name == "untuned" else f"{name} (tuned)"))
        ax.set(xlabel="inner step (SGD update)", ylabel=label, title=label,
               yscale=scale)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: hyperparameters (all start at the initial "
                 "values)")
    legend_below(fig, ncol=2)
    fig.savefig(os.path.join(out, PLOTS[1]), dpi=120)
    figures[PLOTS[1]] = fig
    plt.close("all")
    return figures


if __name__ == "__main__":
    main()
