"""Pieces shared by the examples: the MLP helpers of mnist, lr_tuning and
hyper_cleaning, and the ``argparse`` types every example's flags use.

The examples add their own folder to ``sys.path`` when run as scripts, so
``import common`` works from any working directory.
"""

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

import data_utils


def load_flat_splits(data_dir=None, seed=0, max_train=0):
    """Digits (default) or MNIST splits, flattened to float32 vectors and
    standardised with the training split's statistics.

    Returns:
      ``[(x, y)] * 3`` for train / validation / test as JAX arrays (labels
      ``int32``). Prints the loader's note (e.g. that only the MNIST test
      files were found and were split three ways).
    """
    if data_dir:
        splits = data_utils.load_mnist_splits(data_dir, seed=seed)
    else:
        splits = data_utils.load_digits_splits(seed=seed)
    if splits.note:
        print(splits.note)
    (xtr, ytr), (xva, yva), (xte, yte) = splits.train, splits.val, splits.test
    flat = [x.reshape(len(x), -1).astype(np.float32) for x in (xtr, xva, xte)]
    xtr, xva, xte = data_utils.standardize(*flat)
    if max_train:
        xtr, ytr = xtr[:max_train], ytr[:max_train]
    return [(jnp.asarray(x), jnp.asarray(y, jnp.int32))
            for x, y in ((xtr, ytr), (xva, yva), (xte, yte))]


def init_mlp(key, sizes, gain=2.0):
    """Dense layers ``{"w", "b"}`` with weights ~ N(0, gain / fan_in)."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) * np.sqrt(gain / m),
             "b": jnp.zeros(n)} for k, m, n in zip(keys, sizes, sizes[1:])]


def logits(params, x):
    """ReLU MLP (a linear classifier for a single layer)."""
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params, batch):
    x, y = batch[0], batch[1]
    return optax.softmax_cross_entropy_with_integer_labels(
        logits(params, x), y).mean()


@jax.jit
def evaluate(params, batch):
    """(mean cross-entropy, accuracy) on a whole split."""
    x, y = batch[0], batch[1]
    out = logits(params, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return ce, jnp.mean(jnp.argmax(out, -1) == y)


def batch_indices(seed, step, n, size, count=None):
    """Indices of the batch(es) of one step, a pure function of
    ``(seed, step)``: every method sees the same stream of batches, and a
    resumed run replays exactly the same data order."""
    rng = np.random.default_rng([seed, step])
    shape = (size,) if count is None else (count, size)
    return rng.integers(0, n, size=shape)


def take(data, idx):
    """The rows ``idx`` of every array of a split."""
    return tuple(a[idx] for a in data)


# -- command-line types -------------------------------------------------------
#
# ``type=`` functions for argparse: a bad value raises ArgumentTypeError, so
# the parser exits with its usage message and status 2, naming the flag
# (argparse adds "argument --flag: "), the value and what is allowed.

def _fail(what, text):
    raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}")


def int_in(low=None, high=None, what=None):
    """A type function for integers in ``[low, high]`` (None: unbounded)."""
    if what is None:
        what = (f"an integer in [{low}, {high}]" if high is not None
                else f"an integer >= {low}" if low is not None
                else "an integer")

    def parse(text):
        try:
            value = int(text)
        except (TypeError, ValueError):
            _fail(what, text)
        if (low is not None and value < low) or (
                high is not None and value > high):
            _fail(what, text)
        return value
    parse.__name__ = what
    return parse


def float_in(low=None, high=None, low_open=False, high_open=False,
             what=None):
    """A type function for finite floats in the interval from ``low`` to
    ``high`` (None: unbounded; ``*_open``: the end is excluded). NaN and
    infinities are always refused."""
    if what is None:
        what = "a finite number"
        if low is not None and high is not None:
            what += (f" in {'(' if low_open else '['}{low:g}, {high:g}"
                     f"{')' if high_open else ']'}")
        elif low is not None:
            what += f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            what += f" {'<' if high_open else '<='} {high:g}"

    def parse(text):
        try:
            value = float(text)
        except (TypeError, ValueError):
            _fail(what, text)
        if not math.isfinite(value):
            _fail(what, text)
        if low is not None and (value < low or (low_open and value == low)):
            _fail(what, text)
        if high is not None and (value > high
                                 or (high_open and value == high)):
            _fail(what, text)
        return value
    parse.__name__ = what
    return parse


#: Sizes, counts, steps, intervals: 1, 2, ...
positive_int = int_in(1, what="a positive integer (>= 1)")
#: Counts where 0 means "all" or "none": 0, 1, ...
nonnegative_int = int_in(0, what="an integer >= 0")
#: Seeds: JAX's ``PRNGKey`` takes 32 bits (larger seeds wrap around) and
#: numpy's seed sequences refuse negative ones.
seed_int = int_in(0, 2 ** 32 - 1, what="an integer in [0, 2**32 - 1]")
#: Learning rates, step sizes, scales: finite and > 0 (nan and inf refused).
positive_float = float_in(0.0, low_open=True)
#: Finite and >= 0.
nonnegative_float = float_in(0.0)
#: Any finite number (initial values of log-parametrised hyperparameters).
finite_float = float_in()
#: Fractions and discounts: [0, 1].
fraction = float_in(0.0, 1.0)
#: Probabilities that pass through a logit: (0, 1).
open_fraction = float_in(0.0, 1.0, low_open=True, high_open=True)


def _items(text):
    return [t.strip() for t in str(text).split(",") if t.strip()]


def name_list(known, what="method"):
    """A type function for a comma-separated subset of ``known`` names.

    Returns the names joined by commas (blanks and repeats dropped), so the
    flag stays a string; unknown names and an empty list are refused.
    """
    known = tuple(known)
    choices = ", ".join(known)

    def parse(text):
        names = list(dict.fromkeys(_items(text)))
        if not names:
            raise argparse.ArgumentTypeError(
                f"must name at least one {what} (comma-separated, from "
                f"{choices}); got {text!r}")
        unknown = [n for n in names if n not in known]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what}{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))} in {text!r}; choose "
                f"(comma-separated) from {choices}")
        return ",".join(names)
    parse.__name__ = f"{what} list"
    return parse


def number_list(item_type):
    """A type function for a non-empty comma-separated list of numbers, each
    checked by ``item_type`` (e.g. :data:`positive_float`); returns the
    items joined by commas (blanks dropped), so the flag stays a string."""
    def parse(text):
        items = _items(text)
        if not items:
            raise argparse.ArgumentTypeError(
                f"must be a non-empty comma-separated list, every item "
                f"{item_type.__name__}; got {text!r}")
        for item in items:
            try:
                item_type(item)
            except argparse.ArgumentTypeError as e:
                raise argparse.ArgumentTypeError(
                    f"every item {e} (in {text!r})") from None
        return ",".join(items)
    parse.__name__ = f"list of {item_type.__name__}"
    return parse
