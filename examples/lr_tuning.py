r"""Tune the learning rate and momentum of SGD by hypergradients.

The inner optimizer is SGD with heavy-ball momentum whose learning rate
:math:`\eta = e^{\rho}` (log-parametrised, so it stays positive) and momentum
:math:`\mu = \sigma(z)` (logit-parametrised, so it stays in (0, 1)) are the
hyperparameters ``{"log_lr": rho, "mom_logit": z}``. gradhpo differentiates
the inner step itself, so the one-step hypergradient of an optimizer
hyperparameter is the Baydin et al. (2018) one (ALGORITHMS.md §1.5):

.. math::

   \frac{\partial L_{val}(w_{t+1})}{\partial\rho}
     = -\eta\,\langle \nabla_w L_{val}(w_{t+1}), m_{t+1}\rangle, \qquad
   \frac{\partial L_{val}(w_{t+1})}{\partial z}
     = -\eta\,\mu(1-\mu)\,\langle \nabla_w L_{val}(w_{t+1}), m_t\rangle,

with :math:`m_{t+1} = \mu m_t + g_t` the momentum buffer. The optimizer is
given to gradhpo in two equivalent ways, and the script checks that they
produce the same schedule:

* a callable ``lambda hp: optax.sgd(exp(hp["log_lr"]),
  momentum=sigmoid(hp["mom_logit"]))``;
* a callable returning ``optax.inject_hyperparams(optax.sgd)(...)``: the
  injected values live in the optimizer state, and gradhpo refreshes them
  from the current hyperparameters at every step (so they are current and
  differentiable).

Methods compared on an MLP (digits by default, MNIST with ``--data-dir``),
all from the same initial weights and the same stream of minibatches:

* T1–T2 (one outer step per inner step), with both optimizer forms;
* Greedy (ICLR 2025 submission #6297) with a horizon of ``--horizon`` inner
  steps and discount ``--gamma``, one outer step per horizon, and the same
  with ``gamma = 0`` as a control;
* a grid of fixed learning rates (momentum held at its initial value)
  given, all together, the largest gradient-evaluation budget any tuned run
  spent.

Cost accounting, in gradient evaluations G (one forward and backward pass of
the training loss on one training batch), as gradhpo itself counts them
(``state.metadata["grad_evals"]``, documented in ``gradhpo.utils.cost``):
a plain SGD step is 1 G; a T1–T2 step is 4 G here (training gradient,
validation gradient on a batch of the same size, one second-order
vector-Jacobian product counted as 2 G); a Greedy call of horizon H is
4H G. A tuned run of S inner steps thus costs 4S G. The grid is given the
largest budget B a tuned run spent: each of its K learning rates trains
for :math:`\lfloor B/K - s\rfloor` plain steps (1 G each) and is charged
:math:`s = n_v / (3\,\mathrm{batch})` more for the validation pass that
ranks it (a forward pass over the :math:`n_v` validation examples, counted
as a third of a gradient evaluation per training batch). A grid row shows
what that learning rate cost; the "grid best" row the whole grid's cost,
at most B.

Short-horizon bias (Wu et al. 2018, ALGORITHMS.md §4.6): a one-step
hypergradient asks "which learning rate makes the *next* validation loss
smallest?". Early on, consecutive gradients agree and the answer can be
"larger"; once the gradient noise dominates the signal, the greedy answer is
a smaller step (on a noisy quadratic the one-step optimum is
:math:`\eta^* = \sum_i h_i^2 A_i / \sum_i h_i (h_i^2 A_i + \sigma_i^2)`,
which goes to 0 as :math:`A_i = E[w_i^2]` shrinks), although a larger step
would keep making progress over the rest of training. Greedy learning-rate
schedules therefore tend to decay too fast. The fixed weight decay in the
training loss (``--weight-decay``) keeps the gradient noise from vanishing
late in training, as it would once an unregularised MLP memorises the 1,079
digits (then every schedule freezes).

What the default run shows (digits, seed 0, start at lr 0.3, momentum 0.5):
T1–T2 decays the learning rate about sixfold (to ~0.05) and the momentum to
~0.13 within 1,500 steps; Greedy with H = 10 decays both much less (lr
~0.18). The control row ``Greedy H=10 g=0`` (the same number of outer steps,
fed only the last one-step term) decays just as little as Greedy with
gamma = 0.9, so on this problem the slower decay comes from taking H times
fewer outer steps, not from the discounted sum over the horizon: every term
of Greedy's sum is itself a one-step term, so the bias is averaged, not
removed. Nor is the decay visibly harmful here: the final validation losses
of all tuned runs are within noise of each other and of the best grid
point at equal counted budget (0.120–0.121; the plot marks the grid's best
rate); digits is too small a problem to show the large losses of Wu et
al.'s long runs.

Examples::

    python examples/lr_tuning.py                 # digits, ~30 s
    python examples/lr_tuning.py --data-dir ../shared/data/mnist --steps 3000
    python examples/lr_tuning.py --quick --out /tmp/lr
"""

import argparse
import os
import time

from cli import (add_common_flags, dataset_name, fill_defaults, fraction,
                 legend_below, method_colours, nonnegative_float,
                 nonnegative_int, number_list, open_fraction, positive_float,
                 positive_int, progress, pyplot, quick_help, saved_line,
                 verdict, write_json)

#: Defaults of the flags that --quick changes (their parser default is None,
#: so that a flag given explicitly wins).
NORMAL = dict(steps=1500, eval_every=50, horizon=10,
              grid="0.01,0.03,0.1,0.3", max_train=0)
QUICK = dict(steps=60, eval_every=20, horizon=5, grid="0.03,0.3",
             max_train=300)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="directory with MNIST IDX files")
    p.add_argument("--steps", type=positive_int,
                   help="inner steps per tuned run (a multiple of "
                   f"--horizon; default {NORMAL['steps']})")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--hidden", type=positive_int, default=128)
    p.add_argument("--weight-decay", type=nonnegative_float, default=1e-2,
                   help="fixed L2 coefficient in the training loss")
    p.add_argument("--init-lr", type=positive_float, default=0.3)
    p.add_argument("--init-momentum", type=open_fraction, default=0.5,
                   help="initial momentum, in (0, 1)")
    p.add_argument("--outer-lr", type=positive_float, default=0.03,
                   help="Adam (b2 = 0.99) step on log_lr and mom_logit")
    p.add_argument("--horizon", type=positive_int,
                   help=f"Greedy horizon (default {NORMAL['horizon']})")
    p.add_argument("--gamma", type=fraction, default=0.9,
                   help="Greedy discount, in [0, 1]")
    p.add_argument("--grid", type=number_list(positive_float),
                   help="fixed learning rates sharing the costliest tuned "
                   "run's budget "
                   f"(default {NORMAL['grid']})")
    p.add_argument("--max-train", type=nonnegative_int,
                   help="use at most this many training examples (0: all; "
                   "default 0)")
    p.add_argument("--eval-every", type=positive_int,
                   help=f"default {NORMAL['eval_every']}")
    add_common_flags(p, out="runs/lr_tuning",
                     quick=quick_help("a few steps on a small subset (for "
                                      "tests)", NORMAL, QUICK))
    args = fill_defaults(p.parse_args(argv), NORMAL, QUICK)
    if args.steps % args.horizon:
        p.error(f"--steps ({args.steps}) must be a multiple of --horizon "
                f"({args.horizon})")
    return args


if __name__ == "__main__":
    parse_args()    # --help and usage errors before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gradhpo as gh  # noqa: E402

from common import (  # noqa: E402
    batch_indices, evaluate, init_mlp, load_flat_splits, logits, take)


# -- data and model -----------------------------------------------------------

def val_loss(params, hp, batch):
    """Mean cross-entropy (the hyperparameters act through the optimizer)."""
    del hp
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        logits(params, x), y).mean()


def make_train_loss(weight_decay):
    """Cross-entropy + a fixed weight_decay / 2 * ||W||^2 (not tuned here):
    with it the training loss has no interpolating minimum, so the gradient
    noise does not vanish late in training, as in most real training."""
    def train_loss(params, hp, batch):
        l2 = sum(jnp.sum(layer["w"] ** 2) for layer in params)
        return val_loss(params, hp, batch) + 0.5 * weight_decay * l2
    return train_loss


# -- the two forms of the inner optimizer -------------------------------------

def lr_and_momentum(hp):
    """(eta, mu) = (exp(rho), sigmoid(z))."""
    return jnp.exp(hp["log_lr"]), jax.nn.sigmoid(hp["mom_logit"])


def sgd_callable(hp):
    """The inner optimizer as a plain callable of the hyperparameters."""
    lr, mom = lr_and_momentum(hp)
    return optax.sgd(lr, momentum=mom)


def sgd_injected(hp):
    """The same optimizer through ``optax.inject_hyperparams``: the values
    are stored in the optimizer state, and gradhpo refreshes them from
    ``hp`` before every update."""
    lr, mom = lr_and_momentum(hp)
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr,
                                               momentum=mom)


def initial_hyperparams(args):
    mom = args.init_momentum
    return {"log_lr": jnp.array(np.log(args.init_lr), jnp.float32),
            "mom_logit": jnp.array(np.log(mom / (1 - mom)), jnp.float32)}


# -- runs ---------------------------------------------------------------------

def stacked(data, seed, first, count, size, offset):
    """Batches of inner steps first .. first + count - 1, stacked on a
    leading axis (Greedy's horizon)."""
    idx = np.stack([batch_indices(seed + offset, first + i, len(data[0]),
                                  size) for i in range(count)])
    return take(data, idx)


def run_hpo(name, opt, horizon, params, hp, data, args):
    """Runs one gradient-based method for ``args.steps`` inner steps.

    Returns the final state, the learning rate and momentum in force at
    every inner step, and the validation curve: ``(gradient evaluations
    counted by gradhpo, validation loss)`` pairs.
    """
    train, val = data
    state = opt.init(params, hp)
    calls = args.steps // horizon
    lrs, moms = [], []
    curve = [(0.0, float(evaluate(params, val)[0]))]    # the initial point
    for call in progress(range(calls), desc=name, leave=False):
        first = call * horizon
        if horizon == 1:
            tb = take(train, batch_indices(args.seed, first, len(train[0]),
                                           args.batch_size))
            vb = take(val, batch_indices(args.seed + 1, first, len(val[0]),
                                         args.batch_size))
        else:
            tb = stacked(train, args.seed, first, horizon, args.batch_size, 0)
            vb = stacked(val, args.seed, first, horizon, args.batch_size, 1)
        # the rates used by this call's inner steps (before the outer update)
        lr, mom = lr_and_momentum(state.hyperparams)
        lrs.append(lr)
        moms.append(mom)
        state = opt.step(state, tb, vb)
        done = (call + 1) * horizon
        if done % args.eval_every < horizon or call + 1 == calls:
            curve.append((float(state.metadata["grad_evals"]),
                          float(evaluate(state.params, val)[0])))
    lrs = np.repeat(np.asarray(jnp.stack(lrs)), horizon).tolist()
    moms = np.repeat(np.asarray(jnp.stack(moms)), horizon).tolist()
    return state, lrs, moms, curve


def run_fixed(train_loss, lr, mom, steps, params, data, args):
    """Plain SGD with momentum at a fixed learning rate, one jitted step;
    the curve counts 1 G per step."""
    train, val = data
    tx = optax.sgd(lr, momentum=mom)

    @jax.jit
    def step(p, s, batch):
        g = jax.grad(train_loss)(p, None, batch)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = params, tx.init(params)
    curve = [(0.0, float(evaluate(params, val)[0]))]    # the initial point
    for i in range(steps):
        p, s = step(p, s, take(train, batch_indices(
            args.seed, i, len(train[0]), args.batch_size)))
        if (i + 1) % args.eval_every == 0 or i + 1 == steps:
            curve.append((float(i + 1), float(evaluate(p, val)[0])))
    return p, curve


# -- main ---------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    train, val, test = load_flat_splits(args.data_dir, args.seed,
                                        args.max_train)
    sizes = (train[0].shape[1], args.hidden, args.hidden, 10)
    params = init_mlp(jax.random.PRNGKey(args.seed), sizes)
    hp = initial_hyperparams(args)
    # b2 = 0.99 (not Adam's 0.999): the hypergradients of the first steps
    # are ~100x the later ones and would otherwise freeze the schedule
    outer = optax.adam(args.outer_lr, b2=0.99)
    loss = make_train_loss(args.weight_decay)
    tuned = {
        "T1-T2": (gh.T1T2(loss, val_loss, sgd_callable, outer), 1),
        "T1-T2 (inject)": (gh.T1T2(loss, val_loss, sgd_injected, outer), 1),
        f"Greedy H={args.horizon}": (gh.Greedy(
            loss, val_loss, sgd_callable, outer, horizon=args.horizon,
            gamma=args.gamma), args.horizon),
        # control: the same outer steps (one per H inner steps) fed only the
        # last one-step term, to separate the effect of the horizon from
        # that of taking H times fewer outer steps
        f"Greedy H={args.horizon} g=0": (gh.Greedy(
            loss, val_loss, sgd_callable, outer, horizon=args.horizon,
            gamma=0.0), args.horizon),
    }
    rows, schedules, curves = [], {}, {}
    for name, (opt, horizon) in tuned.items():
        start = time.perf_counter()
        state, lrs, moms, curve = run_hpo(name, opt, horizon, params, hp,
                                          (train, val), args)
        seconds = time.perf_counter() - start
        rows.append(_row(name, state.params, val, test,
                         state.metadata["grad_evals"], seconds,
                         lrs[-1], moms[-1]))
        schedules[name] = {"lr": lrs, "momentum": moms}
        curves[name] = curve
    grid = [float(x) for x in args.grid.split(",")]
    # the largest budget a tuned run spent, by the library's count, shared
    # by the grid: plain steps (1 G each) and the validation pass that
    # ranks each learning rate
    budget = max(r["grad_evals"] for r in rows)
    select = len(val[0]) / (3 * args.batch_size)
    grid_steps = max(1, int(budget / len(grid) - select))
    grid_rows = []
    for lr in progress(grid, desc="fixed-lr grid", leave=False):
        start = time.perf_counter()
        p, curve = run_fixed(loss, lr, args.init_momentum, grid_steps, params,
                             (train, val), args)
        grid_rows.append(_row(f"fixed lr={lr:g}", p, val, test,
                              grid_steps + select,
                              time.perf_counter() - start, lr,
                              args.init_momentum))
        curves[f"fixed lr={lr:g}"] = curve
    best = min(grid_rows, key=lambda r: r["val_loss"])
    rows += grid_rows
    rows.append(dict(best, method=f"grid best ({best['method']})",
                     grad_evals=sum(r["grad_evals"] for r in grid_rows),
                     seconds=sum(r["seconds"] for r in grid_rows)))
    print_table(rows)
    print(f"grad evals: tuned rows as counted by gradhpo; each fixed lr "
          f"{grid_steps} plain steps + {select:.2f} G for its validation "
          f"pass (a forward pass over {len(val[0])} examples); grid best: "
          f"the whole grid, sharing the budget {budget:.0f} G of the "
          f"costliest tuned run")
    check = max(abs(a - b) for a, b in zip(schedules["T1-T2"]["lr"],
                                           schedules["T1-T2 (inject)"]["lr"]))
    print(f"callable vs inject_hyperparams: max |lr difference| over "
          f"{args.steps} steps = {check:.2e}")
    write_json(os.path.join(args.out, "results.json"),
               {"args": vars(args), "rows": rows, "schedules": schedules,
                "curves": curves, "grid_best_lr": best["final_lr"]},
               indent=1)
    plot(schedules, curves, best["final_lr"], args)
    print(saved_line(args.out, ["results.json", "schedule.png"]))
    # the tuned runs against the grid's pick (by validation loss), which
    # is charged the whole grid; not against each grid point (choosing one
    # by its test accuracy would select on the test set)
    print(verdict([r for r in rows if r not in grid_rows], "test_acc",
                  "test accuracy", baselines=(rows[-1]["method"],)))
    return rows


def _row(name, params, val, test, grad_evals, seconds, lr, mom):
    vloss, _ = evaluate(params, val)
    _, acc = evaluate(params, test)
    return {"method": name, "val_loss": float(vloss), "test_acc": float(acc),
            "grad_evals": float(grad_evals), "seconds": float(seconds),
            "final_lr": float(lr), "final_momentum": float(mom)}


def print_table(rows):
    print(f"{'method':<26} {'val loss':>9} {'test acc':>9} {'grad evals':>11}"
          f" {'time [s]':>9} {'final lr':>9} {'momentum':>9}")
    for r in rows:
        print(f"{r['method']:<26} {r['val_loss']:>9.4f} {r['test_acc']:>9.3f}"
              f" {r['grad_evals']:>11.0f} {r['seconds']:>9.1f} "
              f"{r['final_lr']:>9.4f} {r['final_momentum']:>9.3f}")


def colours(names):
    """One colour per run, the same in every panel: tuned runs in colour,
    the fixed learning rates of the grid in black and greys."""
    return method_colours([n for n in names if not n.startswith("fixed")],
                          [n for n in names if n.startswith("fixed")])


def plot(schedules, curves, best_lr, args):
    """schedule.png: the learned learning rate and momentum per inner step
    (from the initial values at step 0), and the validation loss against
    gradient evaluations (from 0 G), every run in one colour in all three
    panels; each line's ``gid`` is its run. Returns the figure."""
    plt = pyplot()
    colour = colours(curves)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    for name, sched in schedules.items():
        style = "--" if "inject" in name else "-"
        steps = range(len(sched["lr"]))
        axes[0].plot(steps, sched["lr"], style, color=colour[name],
                     label=name, gid=name)
        axes[1].plot(steps, sched["momentum"], style, color=colour[name],
                     gid=name)
    for name in curves:
        if name.startswith("fixed"):   # the grid: constant rates
            lr = float(name.split("=")[1])
            best = abs(lr - best_lr) < 1e-12
            axes[0].axhline(lr, color=colour[name], ls=":",
                            lw=2 if best else 1, gid=name)
            axes[1].axhline(args.init_momentum, color=colour[name], ls=":",
                            lw=1, gid=name)
    axes[0].set(xlabel="inner step (SGD update)", ylabel="learning rate",
                yscale="log", title="learning rate (grid: dotted)")
    axes[1].set(xlabel="inner step (SGD update)", ylabel="momentum",
                title="momentum (grid: fixed at its initial value)")
    for name, curve in curves.items():
        grid = name.startswith("fixed")
        label = (f"{name} (grid best by val. loss)"
                 if grid and abs(float(name.split("=")[1]) - best_lr) < 1e-12
                 else name)
        axes[2].plot(*zip(*curve), ls=":" if grid else (
            "--" if "inject" in name else "-"), marker=".",
            color=colour[name], label=label, gid=name)
    axes[2].set(xlabel="gradient evaluations (G)", ylabel="validation loss",
                yscale="log", title="validation loss")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Learning rate and momentum of an MLP tuned by "
                 f"hypergradients, on {dataset_name(args.data_dir)}")
    handles, labels = axes[2].get_legend_handles_labels()
    legend_below(fig, handles, labels, ncol=4)
    fig.savefig(os.path.join(args.out, "schedule.png"), dpi=120)
    plt.close(fig)
    return fig


if __name__ == "__main__":
    main()
