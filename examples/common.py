"""Pieces shared by the examples: the MLP helpers of mnist, lr_tuning and
hyper_cleaning, and (re-exported from ``cli.py``, which imports only the
standard library) the ``argparse`` types every example's flags use.

This is a support module, not an example: ``python examples/common.py``
only explains that.

The examples add their own folder to ``sys.path`` when run as scripts, so
``import common`` works from any working directory.
"""

if __name__ == "__main__":      # answer before importing JAX
    import cli
    cli.support_module_main(__doc__, "common.py is a support module of the "
                            "examples (imported by mnist.py, lr_tuning.py, "
                            "hyper_cleaning.py, ...); it has nothing to run. "
                            "Run an example, e.g. python examples/mnist.py "
                            "--help.")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import data_utils
from cli import (  # noqa: F401  (the old names of the argparse types)
    _fail, _items, finite_float, float_in, fraction, int_in, name_list,
    nonnegative_float, nonnegative_int, number_list, open_fraction,
    positive_float, positive_int, seed_int)


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
