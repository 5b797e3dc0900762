r"""Benchmark tasks: data, model, losses, search spaces and evaluation.

Each task is a :class:`Problem` (what is tuned, how, and over which
search space) plus a loader that builds one seed's :class:`Task` (the data
split). Every task uses the 10,000 MNIST test images (``t10k-*-ubyte.gz``,
the only MNIST files used), read with the examples' ``data_utils`` loader
and split (seeded) into train / validation / test. Without those files (or
with ``quick``) scikit-learn's 1,797 ``digits`` are split in the same
proportions.

``hyper_cleaning`` (data hyper-cleaning, Franceschi et al. 2017)
    5,000 / 1,000 / 4,000; 40 % of the training labels are replaced by a
    uniformly drawn *other* class (the same corruption for every method of
    a seed). A linear softmax classifier; the hyperparameters are one
    weight :math:`w_i = \sigma(\ell_i)` per training example. Training
    loss: the weighted mean :math:`\sum_i w_i c_i / \sum_i w_i` of the
    minibatch cross-entropies :math:`c_i`, so equal weights give the plain
    mean: the untuned default (all weights equal) and gradhpo's starting
    point (every logit 0) train the same model. Oracle: weight 1 on the
    clean examples, 0 on the corrupted ones.
``hyper_cleaning_mlp``
    The same data, weights and search space with a one-hidden-layer MLP
    (784-128-10, ReLU) in place of the linear model.
``l2_small_data``
    1,000 / 1,000 / 8,000 (clean labels); an MLP 784-128-128-10 (ReLU)
    trained with SGD with momentum for :math:`S` steps, i.e. many epochs
    of a small training set, where weight penalties matter. The
    hyperparameters are L2 penalties :math:`\tfrac12 e^{\rho_l}\|W_l\|^2`
    of the three weight matrices: one per layer (every method) or one per
    weight (``gh_*_per_weight``, 118,016 on MNIST). Optuna searches the
    per-layer space, log-uniformly.
``lr_momentum_wd``
    5,000 / 1,000 / 4,000 (clean labels); an MLP 784-128-10 trained by SGD
    whose learning rate :math:`e^{\rho}`, momentum :math:`\sigma(z)` and
    decoupled weight decay :math:`e^{\omega}` (optax's
    ``add_decayed_weights`` before ``sgd``) are the hyperparameters.

``augmentation``
    scikit-learn's digits (8x8), 10 / 10 / 80 % (179 / 179 / 1,439),
    clean labels (few training examples, where augmentation matters); a
    small CNN (two 3x3 convolutions, 16 and 32 channels, the second with
    stride 2, then a linear layer) trained by SGD with
    momentum on augmented images: a bilinear translation by
    :math:`m_s\,S\,u` pixels (:math:`u \sim U[-1, 1]^2`, at most
    :math:`S = 2`) plus Gaussian pixel noise of standard deviation
    :math:`m_n \sigma` (:math:`\sigma = 0.5`), with label smoothing
    :math:`\varepsilon`. Hyperparameters: :math:`m_s, m_n \in [0, 1]` and
    :math:`\varepsilon \in [0, 0.3]`, through sigmoids. The random draws
    are a pure function of the step (the last element of a
    training batch), so the training loss is deterministic given its batch
    and every method sees the same noise at the same step.

Validation loss (every task): the plain mean cross-entropy. A training
batch is ``(x, y, index, step)``: inputs, labels, indices into the
training set and the step's number within its run, repeated per
example so that every leaf has the batch axis (used only by
``augmentation``).
"""

import dataclasses
import os
import pathlib
import sys
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: Where the MNIST test files are looked for (relative to the repository).
MNIST_DIR = ROOT / ".." / "shared" / "data" / "mnist"
MNIST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
MNIST_TOTAL = 10000
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
      x_train, y_train: training inputs and *observed* labels (partly
        corrupted in ``hyper_cleaning``).
      clean: boolean mask of the training examples whose label is right.
      x_val, y_val, x_test, y_test: validation and test data (clean).
      seed: the seed of the split (and of the models' initial weights).
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
    seed: int = 0

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_val(self) -> int:
        return int(self.y_val.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


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


def split(name: str, sizes: Tuple[int, int, int], corruption: float,
          seed: int, quick: bool = False,
          data_dir: Optional[os.PathLike] = None, digits: bool = False,
          centre: bool = True) -> Task:
    """One seed's split of a task's data.

    ``sizes`` are the train / validation / test counts on MNIST (out of
    10,000); on digits (always with ``digits``) the same fractions of
    1,797 are used (the test set takes the rest when the sizes add up to
    10,000). With ``centre`` the inputs are centred by the training mean.
    """
    dataset = ("MNIST" if (not quick and not digits
                           and mnist_available(data_dir)) else "digits")
    x, y = _raw(dataset, data_dir)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    n_tr = len(y) * sizes[0] // MNIST_TOTAL
    n_va = len(y) * sizes[1] // MNIST_TOTAL
    n_te = (len(y) - n_tr - n_va if sum(sizes) == MNIST_TOTAL
            else len(y) * sizes[2] // MNIST_TOTAL)
    tr = perm[:n_tr]
    va = perm[n_tr:n_tr + n_va]
    te = perm[n_tr + n_va:n_tr + n_va + n_te]
    mean = x[tr].mean(axis=0)
    if corruption > 0:
        y_train, clean = corrupt(y[tr], corruption, rng)
    else:
        y_train, clean = y[tr], np.ones(len(tr), bool)
    mean = mean if centre else np.zeros_like(mean)
    where = ("the MNIST test files (t10k), the only MNIST files used"
             if dataset == "MNIST" else
             "scikit-learn digits" + ("" if quick or digits else
                                      " (the MNIST files were not found)"))
    source = (f"{where}: {len(tr)} train / {len(va)} validation / "
              f"{len(te)} test, split with seed {seed}")
    if corruption > 0:
        source += (f"; {int(round(corruption * 100))} % of the training "
                   "labels corrupted to another class")

    def arr(a, dtype=jnp.float32):
        return jnp.asarray(a, dtype)

    return Task(name, dataset, source,
                arr(x[tr] - mean), arr(y_train, jnp.int32), clean,
                arr(x[va] - mean), arr(y[va], jnp.int32),
                arr(x[te] - mean), arr(y[te], jnp.int32), seed)


# -- shared model pieces ---------------------------------------------------

def cross_entropy(z, y):
    """Per-example cross-entropies of logits ``z`` and labels ``y``."""
    return jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(
        z, y[:, None], axis=-1)[:, 0]


def mlp_init(key, sizes):
    """He-normal weights, zero biases: ``{"l0": {"W", "b"}, ...}``."""
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"l{i}"] = {
            "W": jax.random.normal(sub, (a, b)) * jnp.sqrt(2.0 / a),
            "b": jnp.zeros(b)}
    return params


def mlp_predict(params, x):
    """Logits of a ReLU MLP with layers ``l0, l1, ...``."""
    n = len(params)
    for i in range(n):
        layer = params[f"l{i}"]
        x = x @ layer["W"] + layer["b"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def linear_predict(params, x):
    return x @ params["W"] + params["b"]


def mean_val_loss(predict):
    """The validation loss of a model: mean cross-entropy of ``(x, y)``."""
    def val_loss(params, hyperparams, batch):
        del hyperparams
        x, y = batch
        return jnp.mean(cross_entropy(predict(params, x), y))
    return val_loss


@dataclasses.dataclass(frozen=True, eq=False)
class Problem:
    """What a task tunes, and how (one module-level instance per task, so
    equal gradhpo optimizers share their compilations).

    Attributes:
      name: the task's key.
      load: ``(seed, quick, data_dir) -> Task``.
      init_params: ``task -> params`` (the same for every model of a seed).
      predict: ``(params, x) -> logits``.
      train_loss, val_loss: gradhpo's losses; a training batch is
        ``(x, y, index)`` (indices into the training set), a validation
        batch ``(x, y)``.
      inner: the inner optimizer: an optax transformation, or a callable
        of the hyperparameters returning one.
      default: ``task -> hyperparams``: the untuned values.
      suggest: ``(optuna_trial, task) -> hyperparams``: Optuna's search
        space, sampled in the same parametrisation.
      gh_methods: gradhpo method name -> (algorithm, hyperparameter
        variant).
      gh_init: ``(task, variant) -> hyperparams``: gradhpo's start (the
        default, broadcast to the variant's shape).
      hyper_lr: Adam's learning rate on the hyperparameters.
      oracle: ``task -> hyperparams`` of a reference that knows the truth,
        or ``None``.
      diagnostics: ``(task, hyperparams) -> dict`` of numbers reported with
        each gradhpo row, or ``None``.
      space: one line describing the search space.
    """
    name: str
    load: Callable
    init_params: Callable
    predict: Callable
    train_loss: Callable
    val_loss: Callable
    inner: Any
    default: Callable
    suggest: Callable
    gh_methods: Dict[str, Tuple[str, str]]
    gh_init: Callable
    hyper_lr: float
    space: str
    oracle: Optional[Callable] = None
    diagnostics: Optional[Callable] = None

    def optimizer(self, hyperparams) -> optax.GradientTransformation:
        """The inner optax transformation at ``hyperparams``."""
        if isinstance(self.inner, optax.GradientTransformation):
            return self.inner
        return self.inner(hyperparams)


# -- hyper_cleaning ----------------------------------------------------------

LOGIT_CLIP = 30.0


def _hc_load(seed, quick=False, data_dir=None):
    return split("hyper_cleaning", (5000, 1000, 4000), CORRUPTION, seed,
                 quick, data_dir)


def _hc_init(task):
    return {"W": jnp.zeros((task.n_features, NUM_CLASSES)),
            "b": jnp.zeros(NUM_CLASSES)}


def weighted_loss(params, weights, batch, predict=linear_predict):
    """Weighted mean cross-entropy of ``batch = (x, y, index, ...)``."""
    x, y = batch[0], batch[1]
    ce = cross_entropy(predict(params, x), y)
    return jnp.sum(weights * ce) / (jnp.sum(weights) + 1e-8)


def _hc_train_loss(params, hyperparams, batch):
    """Example weights ``sigmoid(logit)`` of the batch's examples."""
    w = jax.nn.sigmoid(hyperparams["logit"][batch[2]])
    return weighted_loss(params, w, batch)


def _hc_mlp_train_loss(params, hyperparams, batch):
    """The same weighted loss for the MLP."""
    w = jax.nn.sigmoid(hyperparams["logit"][batch[2]])
    return weighted_loss(params, w, batch, mlp_predict)


def _hc_mlp_load(seed, quick=False, data_dir=None):
    task = _hc_load(seed, quick, data_dir)
    return dataclasses.replace(task, name="hyper_cleaning_mlp")


def _hc_mlp_init(task):
    return mlp_init(jax.random.PRNGKey(task.seed),
                    (task.n_features, 128, NUM_CLASSES))


def _weights_to_logits(w):
    w = np.asarray(w, np.float64)
    with np.errstate(divide="ignore"):
        z = np.log(w) - np.log1p(-w)
    return jnp.asarray(np.clip(z, -LOGIT_CLIP, LOGIT_CLIP), jnp.float32)


def _hc_suggest(trial, task):
    """One weight in [0, 1] per training example."""
    return {"logit": _weights_to_logits(
        [trial.suggest_float(f"w{i}", 0.0, 1.0)
         for i in range(task.n_train)])}


def _hc_default(task):
    return {"logit": jnp.zeros(task.n_train)}


def _hc_oracle(task):
    return {"logit": jnp.where(jnp.asarray(task.clean), LOGIT_CLIP,
                               -LOGIT_CLIP)}


def _hc_diagnostics(task, hyperparams):
    """Mean final weight of the clean and of the corrupted examples."""
    w = jax.nn.sigmoid(hyperparams["logit"])
    clean = jnp.asarray(task.clean)
    return dict(
        final_weight_clean=float(jnp.sum(jnp.where(clean, w, 0.0))
                                 / max(task.clean.sum(), 1)),
        final_weight_corrupted=float(
            jnp.sum(jnp.where(clean, 0.0, w))
            / max((~task.clean).sum(), 1)))


HYPER_CLEANING = Problem(
    name="hyper_cleaning", load=_hc_load, init_params=_hc_init,
    predict=linear_predict, train_loss=_hc_train_loss,
    val_loss=mean_val_loss(linear_predict), inner=optax.sgd(0.1),
    default=_hc_default, suggest=_hc_suggest,
    gh_methods={"gh_t1t2": ("t1t2", "per_example"),
                "gh_greedy": ("greedy", "per_example"),
                "gh_implicit": ("implicit", "per_example"),
                "gh_hyperdistill": ("hyperdistill", "per_example")},
    gh_init=lambda task, variant: _hc_default(task), hyper_lr=0.1,
    space="one weight in [0, 1] per training example (uniform)",
    oracle=_hc_oracle, diagnostics=_hc_diagnostics)

HYPER_CLEANING_MLP = dataclasses.replace(
    HYPER_CLEANING, name="hyper_cleaning_mlp", load=_hc_mlp_load,
    init_params=_hc_mlp_init, predict=mlp_predict,
    train_loss=_hc_mlp_train_loss, val_loss=mean_val_loss(mlp_predict))


# -- l2_small_data -----------------------------------------------------------

L2_DEFAULT = 1e-4
L2_RANGE = (1e-6, 1e-1)
L2_LAYERS = 3


def _l2_load(seed, quick=False, data_dir=None):
    return split("l2_small_data", (1000, 1000, 8000), 0.0, seed, quick,
                 data_dir)


def _l2_init(task):
    return mlp_init(jax.random.PRNGKey(task.seed),
                    (task.n_features, 128, 128, NUM_CLASSES))


def _l2_train_loss(params, hyperparams, batch):
    """Mean cross-entropy + sum over layers of exp(rho_l) |W_l|^2 / 2
    (``rho_l`` a scalar or an array shaped like ``W_l``)."""
    x, y = batch[0], batch[1]
    ce = jnp.mean(cross_entropy(mlp_predict(params, x), y))
    pen = sum(jnp.sum(jnp.exp(hyperparams["log_l2"][k])
                      * jnp.square(params[k]["W"])) for k in params)
    return ce + 0.5 * pen


def _l2_default(task):
    return {"log_l2": {f"l{i}": jnp.asarray(np.log(L2_DEFAULT), jnp.float32)
                       for i in range(L2_LAYERS)}}


def _l2_suggest(trial, task):
    return {"log_l2": {f"l{i}": jnp.asarray(np.log(trial.suggest_float(
        f"l2_l{i}", *L2_RANGE, log=True)), jnp.float32)
        for i in range(L2_LAYERS)}}


def _l2_gh_init(task, variant):
    hp = _l2_default(task)
    if variant == "per_weight":
        params = _l2_init(task)
        hp = {"log_l2": {k: jnp.full(params[k]["W"].shape, v)
                         for k, v in hp["log_l2"].items()}}
    return hp


def _l2_diagnostics(task, hyperparams):
    """Geometric-mean final L2 penalty of each layer."""
    return {f"final_l2_{k}": float(jnp.exp(jnp.mean(v)))
            for k, v in hyperparams["log_l2"].items()}


L2_SMALL_DATA = Problem(
    name="l2_small_data", load=_l2_load, init_params=_l2_init,
    predict=mlp_predict, train_loss=_l2_train_loss,
    val_loss=mean_val_loss(mlp_predict),
    inner=optax.sgd(0.05, momentum=0.9), default=_l2_default,
    suggest=_l2_suggest,
    gh_methods={"gh_t1t2": ("t1t2", "per_layer"),
                "gh_t1t2_per_weight": ("t1t2", "per_weight"),
                "gh_greedy": ("greedy", "per_layer"),
                "gh_forward_mode": ("forward_mode", "per_layer"),
                "gh_forward_mode_every_step": (
                    "forward_mode_every_step", "per_layer"),
                "gh_implicit": ("implicit", "per_layer"),
                "gh_implicit_per_weight": ("implicit", "per_weight"),
                "gh_hyperdistill": ("hyperdistill", "per_layer")},
    gh_init=_l2_gh_init, hyper_lr=0.05,
    space=(f"one L2 penalty per layer ({L2_LAYERS}), log-uniform in "
           f"[{L2_RANGE[0]:g}, {L2_RANGE[1]:g}]"),
    diagnostics=_l2_diagnostics)


# -- lr_momentum_wd ----------------------------------------------------------

LR_DEFAULT, MOMENTUM_DEFAULT, WD_DEFAULT = 0.01, 0.9, 5e-4
LR_RANGE, MOMENTUM_RANGE, WD_RANGE = (1e-3, 1.0), (0.0, 0.99), (1e-6, 1e-2)


def _lr_load(seed, quick=False, data_dir=None):
    return split("lr_momentum_wd", (5000, 1000, 4000), 0.0, seed, quick,
                 data_dir)


def _lr_init(task):
    return mlp_init(jax.random.PRNGKey(task.seed),
                    (task.n_features, 128, NUM_CLASSES))


def _lr_train_loss(params, hyperparams, batch):
    del hyperparams
    x, y = batch[0], batch[1]
    return jnp.mean(cross_entropy(mlp_predict(params, x), y))


def sgd_momentum_wd(hyperparams):
    """SGD with heavy-ball momentum and decoupled weight decay, all three
    hyperparameters differentiable."""
    return optax.chain(
        optax.add_decayed_weights(jnp.exp(hyperparams["log_wd"])),
        optax.sgd(jnp.exp(hyperparams["log_lr"]),
                  momentum=jax.nn.sigmoid(hyperparams["mom_logit"])))


def _lr_hp(lr, momentum, wd):
    def f(v):
        return jnp.asarray(v, jnp.float32)
    return {"log_lr": f(np.log(lr)),
            "mom_logit": f(np.log(momentum) - np.log1p(-momentum)),
            "log_wd": f(np.log(wd))}


def _lr_default(task):
    return _lr_hp(LR_DEFAULT, MOMENTUM_DEFAULT, WD_DEFAULT)


def _lr_suggest(trial, task):
    return _lr_hp(trial.suggest_float("lr", *LR_RANGE, log=True),
                  max(trial.suggest_float("momentum", *MOMENTUM_RANGE),
                      1e-6),
                  trial.suggest_float("weight_decay", *WD_RANGE, log=True))


def _lr_diagnostics(task, hyperparams):
    return dict(final_lr=float(jnp.exp(hyperparams["log_lr"])),
                final_momentum=float(jax.nn.sigmoid(
                    hyperparams["mom_logit"])),
                final_weight_decay=float(jnp.exp(hyperparams["log_wd"])))


LR_MOMENTUM_WD = Problem(
    name="lr_momentum_wd", load=_lr_load, init_params=_lr_init,
    predict=mlp_predict, train_loss=_lr_train_loss,
    val_loss=mean_val_loss(mlp_predict), inner=sgd_momentum_wd,
    default=_lr_default, suggest=_lr_suggest,
    gh_methods={"gh_t1t2": ("t1t2", "scalar"),
                "gh_greedy": ("greedy", "scalar"),
                "gh_forward_mode": ("forward_mode", "scalar"),
                "gh_forward_mode_every_step": (
                    "forward_mode_every_step", "scalar"),
                "gh_hyperdistill": ("hyperdistill", "scalar")},
    gh_init=lambda task, variant: _lr_default(task), hyper_lr=0.05,
    space=(f"learning rate log-uniform in [{LR_RANGE[0]:g}, "
           f"{LR_RANGE[1]:g}], momentum uniform in [{MOMENTUM_RANGE[0]:g}, "
           f"{MOMENTUM_RANGE[1]:g}], weight decay log-uniform in "
           f"[{WD_RANGE[0]:g}, {WD_RANGE[1]:g}]"),
    diagnostics=_lr_diagnostics)


# -- augmentation ------------------------------------------------------------

MAX_SHIFT, MAX_NOISE, MAX_SMOOTHING = 2.0, 0.5, 0.3
SHIFT_DEFAULT, NOISE_DEFAULT, SMOOTHING_DEFAULT = 0.1, 0.1, 0.05


def _aug_load(seed, quick=False, data_dir=None):
    return split("augmentation", (1000, 1000, 8000), 0.0, seed, quick,
                 data_dir, digits=True, centre=False)


def _images(x):
    side = int(round(np.sqrt(x.shape[-1])))
    return x.reshape(x.shape[0], side, side, 1)


def _aug_init(task):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(task.seed), 3)
    side = int(round(np.sqrt(task.n_features)))
    flat = 32 * (-(-side // 2)) ** 2
    return {"c1": jax.random.normal(k1, (3, 3, 1, 16)) * np.sqrt(2 / 9),
            "b1": jnp.zeros(16),
            "c2": jax.random.normal(k2, (3, 3, 16, 32)) * np.sqrt(2 / 144),
            "b2": jnp.zeros(32),
            "W": jax.random.normal(k3, (flat, NUM_CLASSES))
            * np.sqrt(1 / flat),
            "b": jnp.zeros(NUM_CLASSES)}


def _conv(x, kernel, stride):
    """3x3 convolution, zero padding 1, as one matmul over the stacked
    shifted copies (NHWC, HWIO). Written this way because XLA's CPU
    convolution inside a ``lax.scan`` is an order of magnitude slower than
    outside one; a matmul is not."""
    n, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate(
        [xp[:, i:i + h:stride, j:j + w:stride, :]
         for i in range(3) for j in range(3)], axis=-1)
    return patches @ kernel.reshape(-1, kernel.shape[-1])


def cnn_predict(params, x):
    """Logits of the small CNN on flat 8x8 (or 28x28) images."""
    h = _images(x) if x.ndim == 2 else x
    h = jax.nn.relu(_conv(h, params["c1"], 1) + params["b1"])
    h = jax.nn.relu(_conv(h, params["c2"], 2) + params["b2"])
    return h.reshape(h.shape[0], -1) @ params["W"] + params["b"]


def translate(images, shifts, max_shift: int = int(MAX_SHIFT)):
    r"""Bilinear translation of ``(N, H, W, 1)`` images by ``(N, 2)``
    fractional pixel shifts of at most ``max_shift`` (zero-padded,
    differentiable in the shifts): output pixel ``(i, j)`` is input pixel
    ``(i - s_0, j - s_1)``, interpolated.

    A mix of the integer shifts :math:`k \in [-K, K]` with the tent
    weights :math:`\max(0, 1 - |s - k|)` per axis: exact bilinear
    interpolation for :math:`|s| \le K`, vectorised over the batch.
    """
    k = max_shift
    n, h, w = images.shape[:3]
    padded = jnp.pad(images[..., 0], ((0, 0), (k, k), (k, k)))
    offsets = jnp.arange(-k, k + 1, dtype=images.dtype)
    wr = jax.nn.relu(1.0 - jnp.abs(shifts[:, :1] - offsets))   # (N, 2K+1)
    wc = jax.nn.relu(1.0 - jnp.abs(shifts[:, 1:] - offsets))
    # rows[n, a] = the image shifted down by offsets[a] rows
    rows = jnp.stack([padded[:, k - a:k - a + h, :]
                      for a in range(-k, k + 1)], axis=1)
    mixed = jnp.einsum("na,nahw->nhw", wr, rows)
    cols = jnp.stack([mixed[:, :, k - b:k - b + w]
                      for b in range(-k, k + 1)], axis=1)
    return jnp.einsum("nb,nbhw->nhw", wc, cols)[..., None]


def _aug_values(hyperparams):
    """(shift magnitude, noise magnitude, label smoothing)."""
    m = jax.nn.sigmoid(hyperparams["aug_logit"])
    return m[0], m[1], MAX_SMOOTHING * jax.nn.sigmoid(hyperparams["ls_logit"])


def _aug_train_loss(params, hyperparams, batch):
    """Label-smoothed cross-entropy of the augmented batch."""
    x, y, idx, steps = batch
    step = steps.reshape(-1)[0]     # the step number, repeated per example
    m_shift, m_noise, eps = _aug_values(hyperparams)
    images = _images(x)
    del idx
    ku, kz = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(17),
                                                 step))
    u = jax.random.uniform(ku, (images.shape[0], 2), minval=-1.0,
                           maxval=1.0)
    z = jax.random.normal(kz, images.shape)
    images = translate(images, m_shift * MAX_SHIFT * u) \
        + m_noise * MAX_NOISE * z
    labels = optax.smooth_labels(jax.nn.one_hot(y, NUM_CLASSES), eps)
    return jnp.mean(optax.softmax_cross_entropy(
        cnn_predict(params, images), labels))


def _logit(p):
    return float(np.log(p) - np.log1p(-p))


def _aug_hp(shift, noise, smoothing):
    p = np.clip([shift, noise, smoothing / MAX_SMOOTHING], 1e-4, 1 - 1e-4)
    return {"aug_logit": jnp.asarray([_logit(p[0]), _logit(p[1])],
                                     jnp.float32),
            "ls_logit": jnp.asarray(_logit(p[2]), jnp.float32)}


def _aug_default(task):
    return _aug_hp(SHIFT_DEFAULT, NOISE_DEFAULT, SMOOTHING_DEFAULT)


def _aug_suggest(trial, task):
    return _aug_hp(trial.suggest_float("shift", 0.0, 1.0),
                   trial.suggest_float("noise", 0.0, 1.0),
                   trial.suggest_float("label_smoothing", 0.0,
                                       MAX_SMOOTHING))


def _aug_diagnostics(task, hyperparams):
    m_shift, m_noise, eps = _aug_values(hyperparams)
    return dict(final_shift=float(m_shift), final_noise=float(m_noise),
                final_label_smoothing=float(eps))


AUGMENTATION = Problem(
    name="augmentation", load=_aug_load, init_params=_aug_init,
    predict=cnn_predict, train_loss=_aug_train_loss,
    val_loss=mean_val_loss(cnn_predict),
    inner=optax.sgd(0.05, momentum=0.9), default=_aug_default,
    suggest=_aug_suggest,
    gh_methods={"gh_t1t2": ("t1t2", "scalar"),
                "gh_greedy": ("greedy", "scalar"),
                "gh_forward_mode": ("forward_mode", "scalar"),
                "gh_forward_mode_every_step": (
                    "forward_mode_every_step", "scalar"),
                "gh_hyperdistill": ("hyperdistill", "scalar")},
    gh_init=lambda task, variant: _aug_default(task), hyper_lr=0.05,
    space=(f"shift and noise magnitudes uniform in [0, 1] (at most "
           f"{MAX_SHIFT:g} pixels and {MAX_NOISE:g} pixel std), label "
           f"smoothing uniform in [0, {MAX_SMOOTHING:g}]"),
    diagnostics=_aug_diagnostics)


PROBLEMS = {p.name: p for p in (HYPER_CLEANING, HYPER_CLEANING_MLP,
                                L2_SMALL_DATA, LR_MOMENTUM_WD,
                                AUGMENTATION)}
#: Task name -> loader ``(seed, quick=False, data_dir=None) -> Task``.
TASKS = {name: p.load for name, p in PROBLEMS.items()}


def hyper_cleaning(seed: int, quick: bool = False,
                   data_dir: Optional[os.PathLike] = None) -> Task:
    """The ``hyper_cleaning`` task for one seed (split and corruption)."""
    return _hc_load(seed, quick, data_dir)


def _evaluate_impl(problem, params, x, y):
    z = problem.predict(params, x)
    return jnp.mean(jnp.argmax(z, -1) == y), jnp.mean(cross_entropy(z, y))


_evaluate = jax.jit(_evaluate_impl, static_argnums=0)


def evaluate(problem: Problem, params, x, y) -> Tuple[jax.Array, jax.Array]:
    """(accuracy, mean cross-entropy) of the model on ``(x, y)``."""
    return _evaluate(problem, params, x, y)
