r"""Benchmark tasks: data, model, losses and evaluation.

Only ``hyper_cleaning`` exists in this version (data hyper-cleaning,
Franceschi et al. 2017): a linear softmax classifier trained on images
whose training labels are partly corrupted, with one weight per training
example as the hyperparameters.

Data: the 10,000 MNIST test images (``t10k-*-ubyte.gz``), read with the
examples' ``data_utils`` loader and split (seeded) into 5,000 train /
1,000 validation / 4,000 test. Without those files (or with ``quick``),
scikit-learn's 1,797 ``digits`` are split in the same proportions. 40 % of
the training labels are replaced by a uniformly drawn *other* class (the
same corruption for every method of a seed).

Training loss: the weighted mean :math:`\sum_i w_i \ell_i / \sum_i w_i`
of the cross-entropies of a minibatch, :math:`w_i \ge 0` the example
weights; with equal weights it is the plain mean, so the untuned default
(all weights 1) and gradhpo's starting point (every logit 0, weight 1/2)
train the same model. Validation loss: the plain mean cross-entropy.
"""

import dataclasses
import os
import pathlib
import sys
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Where the MNIST test files are looked for (relative to the repository).
MNIST_DIR = ROOT / ".." / "shared" / "data" / "mnist"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
#: Train / validation / test sizes on MNIST (fractions of 10,000 elsewhere).
SIZES = (5000, 1000, 4000)
CORRUPTION = 0.4
NUM_CLASSES = 10


def _data_utils():
    """The examples' ``data_utils`` module (read-only use)."""
    examples = str(ROOT / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import data_utils  # noqa: E402  (the examples folder, put on the path)
    return data_utils


@dataclasses.dataclass(frozen=True)
class Task:
    """One seed's data of a task, as JAX arrays.

    Attributes:
      name: the task's name.
      dataset: a short name of the data set (``"MNIST"`` or ``"digits"``).
      source: one sentence on where the data came from and how it was split.
      x_train, y_train: training inputs and *observed* (partly corrupted)
        labels.
      clean: boolean mask of the training examples whose label is right.
      x_val, y_val, x_test, y_test: validation and test data (clean).
    """
    name: str
    dataset: str
    source: str
    x_train: jax.Array
    y_train: jax.Array
    clean: np.ndarray
    x_val: jax.Array
    y_val: jax.Array
    x_test: jax.Array
    y_test: jax.Array

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.y_val.shape[0])


def mnist_available(data_dir: Optional[os.PathLike] = None) -> bool:
    """Whether the two MNIST test files are in ``data_dir``."""
    d = pathlib.Path(data_dir or MNIST_DIR)
    return all((d / f).is_file() for f in MNIST_FILES)


def _raw(dataset: str, data_dir: Optional[os.PathLike]
         ) -> Tuple[np.ndarray, np.ndarray]:
    """All images (flattened, scaled to [0, 1]) and labels of a data set."""
    du = _data_utils()
    if dataset == "MNIST":
        x, y = du.load_mnist(pathlib.Path(data_dir or MNIST_DIR), "test")
        x = x.reshape(len(x), -1).astype(np.float32) / 255.0
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = d.data.astype(np.float32) / 16.0, d.target
    return x, np.asarray(y, np.int64)


def corrupt(labels: np.ndarray, fraction: float, rng: np.random.Generator
            ) -> Tuple[np.ndarray, np.ndarray]:
    """Replaces ``fraction`` of ``labels`` by a uniformly drawn other class.

    Returns the new labels and the mask of the untouched (clean) ones.
    """
    n = len(labels)
    bad = rng.choice(n, size=int(round(fraction * n)), replace=False)
    out = labels.copy()
    out[bad] = (labels[bad] + rng.integers(1, NUM_CLASSES, len(bad))) \
        % NUM_CLASSES
    clean = np.ones(n, bool)
    clean[bad] = False
    return out, clean


def hyper_cleaning(seed: int, quick: bool = False,
                   data_dir: Optional[os.PathLike] = None) -> Task:
    """The ``hyper_cleaning`` task for one seed (split and corruption).

    MNIST's test files when present and not ``quick``; otherwise digits
    with the same 50 / 10 / 40 % proportions.
    """
    dataset = "MNIST" if (not quick and mnist_available(data_dir)) \
        else "digits"
    x, y = _raw(dataset, data_dir)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    total = sum(SIZES)
    n_tr = len(y) * SIZES[0] // total
    n_va = len(y) * SIZES[1] // total
    tr, va, te = perm[:n_tr], perm[n_tr:n_tr + n_va], perm[n_tr + n_va:]
    mean = x[tr].mean(axis=0)
    y_noisy, clean = corrupt(y[tr], CORRUPTION, rng)
    where = ("the MNIST test files (t10k), the only MNIST files used"
             if dataset == "MNIST" else
             "scikit-learn digits" + ("" if quick else
                                      " (the MNIST files were not found)"))
    source = (f"{where}: {len(tr)} train / {len(va)} validation / "
              f"{len(te)} test, split with seed {seed}; "
              f"{int(round(CORRUPTION * 100))} % of the training labels "
              "corrupted to another class")

    def arr(a, dtype=jnp.float32):
        return jnp.asarray(a, dtype)

    return Task("hyper_cleaning", dataset, source,
                arr(x[tr] - mean), arr(y_noisy, jnp.int32), clean,
                arr(x[va] - mean), arr(y[va], jnp.int32),
                arr(x[te] - mean), arr(y[te], jnp.int32))


TASKS = {"hyper_cleaning": hyper_cleaning}


# -- model and losses (module level: equal optimizers share compilations) --

def init_params(task: Task) -> Dict[str, jax.Array]:
    """The linear softmax model, zero-initialised."""
    d = task.x_train.shape[1]
    return {"W": jnp.zeros((d, NUM_CLASSES)), "b": jnp.zeros(NUM_CLASSES)}


def logits(params, x):
    return x @ params["W"] + params["b"]


def cross_entropy(params, x, y):
    """Per-example cross-entropies."""
    z = logits(params, x)
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(
        z, y[:, None], axis=-1)[:, 0]


def weighted_loss(params, weights, batch):
    """Weighted mean cross-entropy of ``batch = (x, y, index)``;
    ``weights`` are the batch's example weights."""
    x, y, _ = batch
    ce = cross_entropy(params, x, y)
    return jnp.sum(weights * ce) / (jnp.sum(weights) + 1e-8)


def train_loss(params, hyperparams, batch):
    """gradhpo's training loss: weights ``sigmoid(logit)`` of the batch's
    examples (``batch[2]`` holds their indices in the training set)."""
    w = jax.nn.sigmoid(hyperparams["logit"][batch[2]])
    return weighted_loss(params, w, batch)


def val_loss(params, hyperparams, batch):
    """gradhpo's validation loss: the mean cross-entropy of ``(x, y)``."""
    del hyperparams
    x, y = batch
    return jnp.mean(cross_entropy(params, x, y))


@jax.jit
def evaluate(params, x, y) -> Tuple[jax.Array, jax.Array]:
    """(accuracy, mean cross-entropy) of the model on ``(x, y)``."""
    acc = jnp.mean(jnp.argmax(logits(params, x), -1) == y)
    return acc, jnp.mean(cross_entropy(params, x, y))
