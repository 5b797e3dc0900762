"""Tune per-layer L2 penalties of an MLP on scikit-learn's digits with T1–T2.

The model is a 64-128-10 MLP trained with SGD on 400 digits; the penalty of
each layer is exp(rho_l) (log-parametrised so it stays positive). The script
trains twice from the same initial weights and data order: once with the
penalties fixed at their initial value and once with T1–T2 tuning them on a
separate validation split, then prints the validation and test losses of
both. Runs in well under a minute on two CPU cores:

    python examples/quickstart.py
"""

import argparse
import time

from cli import (add_common_flags, fill_defaults, finite_float, int_in,
                 positive_int, progress, quick_help, verdict)

N_TRAIN = N_VAL = 400
#: Defaults of the flags that --quick changes (their parser default is None,
#: so that a flag given explicitly wins).
NORMAL = dict(steps=1500)
QUICK = dict(steps=100)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="It prints its results and writes no files (no --out).")
    parser.add_argument("--steps", type=positive_int,
                        help="steps of each of the two runs (default "
                        f"{NORMAL['steps']})")
    # batches are drawn without replacement from 400 examples
    parser.add_argument("--batch-size", default=64,
                        type=int_in(1, min(N_TRAIN, N_VAL)))
    parser.add_argument("--init-log-l2", type=finite_float, default=-2.0,
                        help="initial log penalty of every layer")
    add_common_flags(parser, quick=quick_help("a short run (for tests)",
                                              NORMAL, QUICK))
    return fill_defaults(parser.parse_args(argv), NORMAL, QUICK)


if __name__ == "__main__":
    parse_args()    # --help and usage errors before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import gradhpo as gh  # noqa: E402


def load_data(seed, n_train=N_TRAIN, n_val=N_VAL):
    """Digits split into standardised train / validation / test arrays."""
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order].astype(np.float32), y[order].astype(np.int32)
    mean, std = x[:n_train].mean(0), x[:n_train].std(0) + 1.0
    x = (x - mean) / std
    cuts = [n_train, n_train + n_val]
    return [(jnp.asarray(a), jnp.asarray(b))
            for a, b in zip(np.split(x, cuts), np.split(y, cuts))]


def init_mlp(key, sizes=(64, 128, 10)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m),
             "b": jnp.zeros(n)} for k, m, n in zip(keys, sizes, sizes[1:])]


def forward(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params, batch):
    x, y = batch
    logits = forward(params, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_loss(params, hyperparams, batch):
    """Cross-entropy plus sum_l exp(rho_l) / 2 * ||W_l||^2."""
    penalty = sum(jnp.exp(rho) * 0.5 * jnp.sum(layer["w"] ** 2)
                  for rho, layer in zip(hyperparams["log_l2"], params))
    return cross_entropy(params, batch) + penalty


def val_loss(params, hyperparams, batch):
    del hyperparams  # the validation loss is the plain cross-entropy
    return cross_entropy(params, batch)


def accuracy(params, batch):
    x, y = batch
    return float(jnp.mean(jnp.argmax(forward(params, x), -1) == y))


def run(opt, params, hyperparams, train, val, steps, batch_size, seed, desc):
    state = opt.init(params, hyperparams)
    rng = np.random.default_rng(seed)
    for _ in progress(range(steps), desc=desc, leave=False):
        idx = rng.choice(len(train[0]), batch_size, replace=False)
        vidx = rng.choice(len(val[0]), batch_size, replace=False)
        state = opt.step(state, (train[0][idx], train[1][idx]),
                         (val[0][vidx], val[1][vidx]))
    return state


def main(argv=None):
    args = parse_args(argv)
    train, val, test = load_data(args.seed)
    params = init_mlp(jax.random.PRNGKey(args.seed))
    hyperparams = {"log_l2": [jnp.array(args.init_log_l2)] * 2}
    inner = optax.sgd(0.1, momentum=0.9)

    # outer learning rate 0 keeps the penalties fixed: the baseline
    fixed = gh.T1T2(train_loss, val_loss, inner, optax.sgd(0.0))
    tuned = gh.T1T2(train_loss, val_loss, inner, optax.adam(0.03))
    start = time.perf_counter()
    results = {}
    for name, opt in [("fixed L2", fixed), ("T1-T2 tuned L2", tuned)]:
        state = run(opt, params, hyperparams, train, val, args.steps,
                    args.batch_size, args.seed, name)
        results[name] = state
    print(f"validation loss at initialisation: "
          f"{float(val_loss(params, hyperparams, val)):.4f}")
    print(f"{'run':<16} {'penalties exp(rho)':<22} {'val loss':>9} "
          f"{'test loss':>9} {'test acc':>8} {'grad evals':>11}")
    rows = []
    for name, state in results.items():
        pens = ", ".join(f"{float(jnp.exp(r)):.2e}"
                         for r in state.hyperparams["log_l2"])
        rows.append({"method": name,
                     "test_loss": float(val_loss(state.params, None, test)),
                     "grad_evals": float(state.metadata["grad_evals"])})
        print(f"{name:<16} {pens:<22} "
              f"{float(val_loss(state.params, None, val)):>9.4f} "
              f"{rows[-1]['test_loss']:>9.4f} "
              f"{accuracy(state.params, test):>8.3f} "
              f"{rows[-1]['grad_evals']:>11.0f}")
    before = float(val_loss(results["fixed L2"].params, None, val))
    after = float(val_loss(results["T1-T2 tuned L2"].params, None, val))
    print(f"validation loss before tuning {before:.4f}, after {after:.4f} "
          f"({args.steps} steps each, {time.perf_counter() - start:.1f} s)")
    print("No files written (quickstart.py only prints).")
    # both runs are T1-T2 steps (the fixed one with an outer step of 0), so
    # gradhpo counts the same gradient evaluations for both
    print(verdict(rows, "test_loss", "test loss", higher_is_better=False,
                  spec=".4f", baselines=("fixed L2",)))
    return before, after


if __name__ == "__main__":
    main()
