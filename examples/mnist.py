"""Tune L2 penalties and the learning rate of an MLP with gradient-based HPO.

Compares T1–T2, Greedy and HyperDistill with random search given the same
total number of gradient evaluations. The hyperparameters are one log L2
penalty per layer (``--per-weight``: one per weight) and the log learning
rate of SGD with momentum (a differentiable optimizer hyperparameter, through
a callable inner optimizer).

Data: scikit-learn's bundled digits by default (no download, 8x8 images);
``--data-dir`` reads MNIST IDX files (when the directory holds only the test
files, as ``../shared/data/mnist`` does, they are split into train /
validation / test and the output says so).

Cost accounting, in gradient evaluations G (one forward and backward pass of
a loss on one batch): a plain SGD step is 1 G; a T1–T2 or HyperDistill step
is 3 G (training gradient, validation gradient, one second-order
vector-Jacobian product counted as 1 G); a Greedy call of horizon H is 3H G.
Random search trains each sampled configuration with plain SGD (1 G a step)
and spends the same total budget over ``--random-trials`` configurations.

Examples::

    python examples/mnist.py                       # digits, ~1 minute
    python examples/mnist.py --data-dir ../shared/data/mnist --steps 2000
    python examples/mnist.py --per-weight --out runs/mnist
"""

import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import gradhpo as gh

from common import (batch_indices, cross_entropy, evaluate, init_mlp,
                    load_flat_splits, take)

COST_PER_STEP = {"T1-T2": 3, "Greedy": 3, "HyperDistill": 3}


# -- data and model -----------------------------------------------------------

def train_loss(params, hp, batch):
    """Cross-entropy + sum_l 1/2 exp(rho_l) * W_l^2 (rho_l scalar or one per
    weight: the same expression broadcasts)."""
    penalty = sum(jnp.sum(0.5 * jnp.exp(rho) * layer["w"] ** 2)
                  for rho, layer in zip(hp["log_l2"], params))
    return cross_entropy(params, batch) + penalty


def val_loss(params, hp, batch):
    del hp
    return cross_entropy(params, batch)


def inner_optimizer(hp):
    return optax.sgd(jnp.exp(hp["log_lr"]), momentum=0.9)


# -- the runs -----------------------------------------------------------------

def initial_hyperparams(params, args, log_l2=None, log_lr=None):
    log_l2 = args.init_log_l2 if log_l2 is None else log_l2
    log_lr = args.init_log_lr if log_lr is None else log_lr
    if args.per_weight:
        l2 = [jnp.full(layer["w"].shape, log_l2) for layer in params]
    else:
        l2 = [jnp.array(log_l2) for _ in params]
    return {"log_l2": l2, "log_lr": jnp.array(log_lr)}


def summarize_hp(hp):
    l2 = ", ".join(f"{float(jnp.mean(jnp.exp(r))):.1e}"
                   for r in hp["log_l2"])
    return f"l2 [{l2}] lr {float(jnp.exp(hp['log_lr'])):.3f}"


def run_hpo(name, opt, init_state, train, val, args, calls, per_call):
    """Runs one gradient-based method; returns its final state and curve.

    ``init_state()`` builds the initial state; with ``--resume`` and a
    checkpoint of this method in ``--checkpoint-dir``, the run continues from
    the checkpoint (the batches of a step are a pure function of the step,
    so the continued run is bit-for-bit the uninterrupted one).
    """
    state, curve = None, []
    ckpt = (os.path.join(args.checkpoint_dir, name)
            if args.checkpoint_dir else None)
    if args.resume and os.path.exists(ckpt + ".npz"):
        state = gh.load_state(ckpt + ".npz", like=init_state())
        with open(ckpt + ".json") as f:
            curve = json.load(f)
        print(f"resuming {name} from {ckpt}.npz at step {int(state.step)}")
    if state is None:
        state = init_state()
    start = int(state.step)
    stacked = per_call if name == "Greedy" and per_call > 1 else None
    for call in tqdm(range(start, calls), desc=name, initial=start,
                     total=calls, leave=False):
        tidx = batch_indices(args.seed, 2 * call, len(train[0]),
                             args.batch_size, stacked)
        vidx = batch_indices(args.seed, 2 * call + 1, len(val[0]),
                             args.batch_size, stacked)
        state = opt.step(state, take(train, tidx), take(val, vidx))
        if (call + 1) % args.eval_every == 0 or call + 1 == calls:
            curve.append(_record(state, val, (call + 1) * per_call
                                 * COST_PER_STEP[name]))
        if ckpt and ((call + 1) % args.checkpoint_every == 0
                     or call + 1 == calls):
            _checkpoint(ckpt, state, curve)
    return state, curve


def _checkpoint(path, state, curve):
    """The state (atomically, by gh.save_state) and then the curve so far;
    a crash between the two leaves a curve one record short at worst."""
    gh.save_state(path + ".npz", state)
    with open(path + ".json.tmp", "w") as f:
        json.dump(curve, f)
    os.replace(path + ".json.tmp", path + ".json")


def _record(state, val, grad_evals):
    loss, _ = evaluate(state.params, val)
    return {"grad_evals": int(grad_evals), "val_loss": float(loss),
            "log_l2": [float(jnp.mean(r))
                       for r in state.hyperparams["log_l2"]],
            "log_lr": float(state.hyperparams["log_lr"])}


def _plain_step(hp):
    """A jitted plain SGD step at fixed hyperparameters (1 G a step)."""
    tx = inner_optimizer(hp)

    @jax.jit
    def step(p, s, batch):
        g = jax.grad(train_loss)(p, hp, batch)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
    return tx, step


def train_fixed(params, hp, train, args, steps):
    """Trains with the hyperparameters held fixed, on the data order of the
    gradient-based runs."""
    tx, step = _plain_step(hp)
    p, s = params, tx.init(params)
    for i in range(steps):
        p, s = step(p, s, take(train, batch_indices(
            args.seed, 2 * i, len(train[0]), args.batch_size)))
    return p


def random_search(params, train, val, args, budget):
    """Plain SGD on sampled configurations; the best by validation loss."""
    rng = np.random.default_rng(args.seed + 1)
    steps = max(1, budget // args.random_trials)
    best, curve, spent = None, [], 0
    for _ in tqdm(range(args.random_trials), desc="random search",
                  leave=False):
        hp = initial_hyperparams(
            params, args, log_l2=rng.uniform(-10.0, 0.0),
            log_lr=rng.uniform(np.log(1e-3), np.log(0.5)))
        p = train_fixed(params, hp, train, args, steps)
        spent += steps
        loss = float(evaluate(p, val)[0])
        if not np.isfinite(loss):
            loss = float("inf")
        if best is None or loss < best[0]:
            best = (loss, p, hp)
        curve.append({"grad_evals": spent, "val_loss": best[0],
                      "log_l2": [float(jnp.mean(r)) for r in hp["log_l2"]],
                      "log_lr": float(hp["log_lr"])})
    return best, curve


# -- main ---------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="directory with MNIST IDX files")
    p.add_argument("--steps", type=int, default=1200,
                   help="inner steps per gradient-based method")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--per-weight", action="store_true",
                   help="one L2 hyperparameter per weight")
    p.add_argument("--horizon", type=int, default=4, help="Greedy horizon")
    p.add_argument("--gamma", type=float, default=0.9,
                   help="Greedy / HyperDistill discount")
    p.add_argument("--outer-lr", type=float, default=0.03)
    p.add_argument("--init-log-l2", type=float, default=-2.0)
    p.add_argument("--init-log-lr", type=float, default=float(np.log(0.02)))
    p.add_argument("--random-trials", type=int, default=6)
    p.add_argument("--max-train", type=int, default=0,
                   help="use at most this many training examples (0: all)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--methods",
                   default="T1-T2,Greedy,HyperDistill,untuned,random",
                   help="comma-separated subset to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/mnist",
                   help="directory for plots and results.json")
    p.add_argument("--checkpoint-dir",
                   help="save each method's state here while it runs")
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--resume", action="store_true",
                   help="continue from the states in --checkpoint-dir")
    p.add_argument("--quick", action="store_true",
                   help="a few steps on a small subset (for tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every, args.random_trials = 48, 8, 2
        args.max_train = args.max_train or 300
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    return args


def build_optimizers(args):
    outer = optax.adam(args.outer_lr)
    return {
        "T1-T2": (gh.T1T2(train_loss, val_loss, inner_optimizer, outer), 1),
        "Greedy": (gh.Greedy(train_loss, val_loss, inner_optimizer, outer,
                             horizon=args.horizon, gamma=args.gamma),
                   args.horizon),
        "HyperDistill": (gh.HyperDistill(
            train_loss, val_loss, inner_optimizer, outer,
            gamma=args.gamma), 1),
    }


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
    train, val, test = load_flat_splits(args.data_dir, args.seed,
                                        args.max_train)
    sizes = (train[0].shape[1], args.hidden, args.hidden, 10)
    params = init_mlp(jax.random.PRNGKey(args.seed), sizes)
    hp = initial_hyperparams(params, args)
    methods = args.methods.split(",")
    rows, curves = [], {}
    for name, (opt, per_call) in build_optimizers(args).items():
        if name not in methods:
            continue
        calls = max(1, args.steps // per_call)
        if name == "HyperDistill":
            first = take(train, batch_indices(args.seed, 0, len(train[0]),
                                              args.batch_size))
            init_state = (lambda o=opt, b=first:
                          o.init(params, hp, batch=b,
                                 key=jax.random.PRNGKey(args.seed)))
        else:
            init_state = (lambda o=opt: o.init(params, hp))
        start = time.perf_counter()
        state, curve = run_hpo(name, opt, init_state, train, val, args,
                               calls, per_call)
        seconds = time.perf_counter() - start
        vloss, _ = evaluate(state.params, val)
        _, acc = evaluate(state.params, test)
        rows.append((name, float(vloss), float(acc),
                     calls * per_call * COST_PER_STEP[name], seconds,
                     summarize_hp(state.hyperparams)))
        curves[name] = curve
    if "untuned" in methods:
        start = time.perf_counter()
        p = train_fixed(params, hp, train, args, args.steps)
        vloss, _ = evaluate(p, val)
        rows.append(("untuned", float(vloss), float(evaluate(p, test)[1]),
                     args.steps, time.perf_counter() - start,
                     summarize_hp(hp)))
    if "random" in methods:
        budget = args.steps * 3
        start = time.perf_counter()
        (loss, p, best_hp), curve = random_search(params, train, val, args,
                                                  budget)
        rows.append(("random search", loss, float(evaluate(p, test)[1]),
                     curve[-1]["grad_evals"], time.perf_counter() - start,
                     summarize_hp(best_hp)))
        curves["random search"] = curve
    print_table(rows)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "rows": [
            dict(zip(["method", "val_loss", "test_acc", "grad_evals",
                      "seconds", "hyperparams"], r)) for r in rows],
            "curves": curves}, f, indent=1)
    plot(curves, args.out)
    return rows


def print_table(rows):
    print(f"{'method':<14} {'val loss':>9} {'test acc':>9} {'grad evals':>11}"
          f" {'time [s]':>9}  final hyperparameters")
    for name, vloss, acc, evals, seconds, hp in rows:
        print(f"{name:<14} {vloss:>9.4f} {acc:>9.3f} {evals:>11d} "
              f"{seconds:>9.1f}  {hp}")


def plot(curves, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([c["grad_evals"] for c in curve],
                [c["val_loss"] for c in curve], marker=".", label=name)
    ax.set_xlabel("gradient evaluations")
    ax.set_ylabel("validation loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "val_loss.png"), dpi=120)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, curve in curves.items():
        if name == "random search":
            continue
        evals = [c["grad_evals"] for c in curve]
        for layer in range(len(curve[0]["log_l2"])):
            axes[0].plot(evals, [np.exp(c["log_l2"][layer]) for c in curve],
                         label=f"{name} layer {layer + 1}")
        axes[1].plot(evals, [np.exp(c["log_lr"]) for c in curve], label=name)
    axes[0].set(xlabel="gradient evaluations", ylabel="L2 penalty",
                yscale="log", title="per-layer L2 (geometric mean)")
    axes[1].set(xlabel="gradient evaluations", ylabel="learning rate",
                title="learning rate")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "hyperparameters.png"), dpi=120)
    plt.close("all")


if __name__ == "__main__":
    main()
