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
the training loss on one training batch), as gradhpo itself counts them
(``state.metadata["grad_evals"]``, documented in ``gradhpo.utils.cost``):
a plain SGD step is 1 G; a T1–T2 step is 4 G here (the training gradient,
the validation gradient on a batch of the same size, and a second-order
product counted as 2 G), a Greedy step 4 G per inner step, a HyperDistill
step 5 G. Random search trains each sampled configuration with plain SGD
(1 G a step) and is given the largest budget any tuned method spent, over
``--random-trials`` configurations; the validation pass that picks the
best configuration is charged too (a forward pass counted as a third of
a gradient evaluation per batch).

Examples::

    python examples/mnist.py                       # digits, ~1 minute
    python examples/mnist.py --data-dir ../shared/data/mnist --steps 2000
    python examples/mnist.py --per-weight --out runs/mnist
    python examples/mnist.py --checkpoint-dir ckpt     # killed? then:
    python examples/mnist.py --checkpoint-dir ckpt --resume

A checkpoint of a method is one folder ``<method>.step-<step>`` in
``--checkpoint-dir`` (its state and its curve, written together and renamed
into place atomically); ``--resume`` continues from the newest one and
refuses one saved with other settings (another ``--seed``, ``--steps``, ...).
"""

import argparse
import json
import math
import os
import re
import shutil
import sys
import time

from cli import (add_common_flags, dataset_name, fill_defaults,
                 finite_float, fraction, fsync_path, legend_below,
                 method_colours, name_list, nonnegative_int, positive_float,
                 positive_int, progress, pyplot, quick_help, saved_line,
                 verdict, write_json)

METHODS = ("T1-T2", "Greedy", "HyperDistill", "untuned", "random")
#: Defaults of the flags that --quick changes (their parser default is None,
#: so that a flag given explicitly wins).
NORMAL = dict(steps=1200, eval_every=50, random_trials=6, max_train=0)
QUICK = dict(steps=48, eval_every=8, random_trials=2, max_train=300)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="directory with MNIST IDX files")
    p.add_argument("--steps", type=positive_int,
                   help="inner steps per gradient-based method (default "
                   f"{NORMAL['steps']})")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--hidden", type=positive_int, default=128)
    p.add_argument("--per-weight", action="store_true",
                   help="one L2 hyperparameter per weight")
    p.add_argument("--horizon", type=positive_int, default=4,
                   help="Greedy horizon")
    p.add_argument("--gamma", type=fraction, default=0.9,
                   help="Greedy / HyperDistill discount, in [0, 1]")
    p.add_argument("--outer-lr", type=positive_float, default=0.03)
    p.add_argument("--init-log-l2", type=finite_float, default=-2.0)
    p.add_argument("--init-log-lr", type=finite_float,
                   default=math.log(0.02))
    p.add_argument("--random-trials", type=positive_int,
                   help=f"default {NORMAL['random_trials']}")
    p.add_argument("--max-train", type=nonnegative_int,
                   help="use at most this many training examples (0: all; "
                   "default 0)")
    p.add_argument("--eval-every", type=positive_int,
                   help=f"default {NORMAL['eval_every']}")
    p.add_argument("--methods", type=name_list(METHODS),
                   default="T1-T2,Greedy,HyperDistill,untuned,random",
                   help="comma-separated subset to run, from "
                   f"{', '.join(METHODS)}")
    p.add_argument("--checkpoint-dir",
                   help="save each method's state here while it runs")
    p.add_argument("--checkpoint-every", type=positive_int, default=100)
    p.add_argument("--resume", action="store_true",
                   help="continue from the states in --checkpoint-dir "
                   "(refused if they were saved with other settings)")
    add_common_flags(p, out="runs/mnist",
                     quick=quick_help("a few steps on a small subset (for "
                                      "tests)", NORMAL, QUICK))
    args = fill_defaults(p.parse_args(argv), NORMAL, QUICK)
    if args.resume and not args.checkpoint_dir:
        p.error("--resume needs --checkpoint-dir")
    return args


if __name__ == "__main__":
    parse_args()    # --help and usage errors before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import gradhpo as gh  # noqa: E402

from common import (  # noqa: E402
    batch_indices, cross_entropy, evaluate, init_mlp, load_flat_splits, take)

TUNED = ("T1-T2", "Greedy", "HyperDistill")
BASELINES = ("untuned", "random search")
#: One colour per method, the same in every plot.
COLOURS = method_colours(TUNED, BASELINES)
#: A marker per method, so that a curve hidden under another still shows.
MARKERS = {"T1-T2": "o", "Greedy": "s", "HyperDistill": "^",
           "untuned": "", "random search": "D"}
PLOTS = ("val_loss.png", "hyperparameters.png")


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


def run_hpo(name, opt, init_state, train, val, args, calls, per_call,
            resume_from=None):
    """Runs one gradient-based method; returns its final state and curve.

    ``init_state()`` builds the initial state; ``resume_from`` (a complete
    checkpoint found by :func:`find_checkpoint`, with ``--resume``)
    continues the run from it (the batches of a step are a pure function of
    the step, so the continued run is bit-for-bit the uninterrupted one).
    With ``--checkpoint-dir``, the state and the curve so far are saved
    together every ``--checkpoint-every`` calls and at the end.
    """
    state, curve = None, []
    if resume_from is not None:
        try:
            state, curve = load_checkpoint(resume_from, init_state())
            print(f"resuming {name} from {resume_from['path']} at step "
                  f"{int(state.step)}")
        except ValueError as e:   # a damaged file: start over, and say so
            print(f"note: cannot resume {name} ({e}); it starts over")
            state, curve = None, []
    if state is None:
        state = init_state()
    config = run_config(args, name)
    start = int(state.step)
    stacked = per_call if name == "Greedy" and per_call > 1 else None
    for call in progress(range(start, calls), desc=name, initial=start,
                         total=calls, leave=False):
        tidx = batch_indices(args.seed, 2 * call, len(train[0]),
                             args.batch_size, stacked)
        vidx = batch_indices(args.seed, 2 * call + 1, len(val[0]),
                             args.batch_size, stacked)
        state = opt.step(state, take(train, tidx), take(val, vidx))
        if (call + 1) % args.eval_every == 0 or call + 1 == calls:
            curve.append(_record(state, val,
                                 state.metadata["grad_evals"]))
        if args.checkpoint_dir and ((call + 1) % args.checkpoint_every == 0
                                    or call + 1 == calls):
            save_checkpoint(args.checkpoint_dir, name, state, curve, config)
    return state, curve


# -- checkpoints --------------------------------------------------------------
#
# A checkpoint of method NAME is one folder, ``NAME.step-<step>`` in
# --checkpoint-dir, holding ``state.npz`` (gh.save_state) and ``run.json``
# (the run's configuration, the step and the curve so far). Both files are
# written into a temporary folder ``.tmp-NAME.<pid>``, flushed, and then the
# folder is renamed into place (one atomic rename), and only then are older
# checkpoints of NAME removed. A kill at any moment therefore leaves a
# complete checkpoint (the old or the new one), never a state without its
# records; the temporary folders of killed writers are removed by the next
# save. ``--resume`` reads the newest complete checkpoint and refuses one
# written with other settings (--seed, --steps, ...).

#: Version of the checkpoint layout above (``run.json``'s "format"); the
#: layout of older versions, ``NAME.npz`` and ``NAME.json`` side by side,
#: is format 1 and is not resumed (it does not record the settings).
CHECKPOINT_FORMAT = 2
STATE_FILE, RUN_FILE = "state.npz", "run.json"


def run_config(args, name):
    """The settings that determine method ``name``'s run: a checkpoint is
    resumed only by a run with the same values (keys are flag names)."""
    config = {"method": name,
              "data_dir": (os.path.abspath(args.data_dir) if args.data_dir
                           else None),
              "max_train": args.max_train, "seed": args.seed,
              "steps": args.steps, "batch_size": args.batch_size,
              "hidden": args.hidden, "per_weight": args.per_weight,
              "outer_lr": args.outer_lr, "init_log_l2": args.init_log_l2,
              "init_log_lr": args.init_log_lr, "eval_every": args.eval_every}
    if name == "Greedy":
        config["horizon"] = args.horizon
    if name in ("Greedy", "HyperDistill"):
        config["gamma"] = args.gamma
    return config


def _checkpoint_folders(directory, name):
    """``[(step, path)]`` of the checkpoint folders of ``name``, newest
    first."""
    pattern = re.compile(re.escape(name) + r"\.step-(\d+)")
    try:
        entries = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), os.path.join(directory, entry))
             for entry in entries
             for m in [pattern.fullmatch(entry)] if m]
    return sorted(found, reverse=True)


def _write_records(path, records):
    write_json(path, records)


def _remove_temporaries(directory, name):
    """Removes the temporary folders of ``name`` left by killed writers
    (and this process's own, from a failed save)."""
    prefix = f".tmp-{name}."
    for entry in os.listdir(directory):
        pid = entry[len(prefix):].split(".")[0]
        if not entry.startswith(prefix) or not pid.isdigit():
            continue
        if int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)
                continue              # its writer is still running
            except ProcessLookupError:
                pass
            except OSError:           # pragma: no cover - another user's
                continue
        shutil.rmtree(os.path.join(directory, entry), ignore_errors=True)


def save_checkpoint(directory, name, state, curve, config):
    """Saves the state and the records of ``name`` as one unit (see above)."""
    step = int(state.step)
    _remove_temporaries(directory, name)
    tmp = os.path.join(directory, f".tmp-{name}.{os.getpid()}")
    os.makedirs(tmp)
    gh.save_state(os.path.join(tmp, STATE_FILE), state)
    _write_records(os.path.join(tmp, RUN_FILE), {
        "format": CHECKPOINT_FORMAT, "method": name, "step": step,
        "config": config, "curve": curve})
    fsync_path(tmp)
    final = os.path.join(directory, f"{name}.step-{step:08d}")
    if os.path.exists(final):     # the same step saved by an earlier run
        old = os.path.join(directory, f".tmp-{name}.{os.getpid()}.old")
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_path(directory)
    for _, path in _checkpoint_folders(directory, name):
        if path != final:
            shutil.rmtree(path, ignore_errors=True)


def find_checkpoint(directory, name):
    """The newest complete checkpoint of ``name`` in ``directory``:
    ``{"path", "step", "config", "curve"}``, or None (after printing a
    note for what is skipped: unreadable checkpoints, and the files of the
    older layout, ``NAME.npz`` / ``NAME.json``, which are not resumed)."""
    found = None
    for step, path in _checkpoint_folders(directory, name):
        try:
            with open(os.path.join(path, RUN_FILE)) as f:
                run = json.load(f)
            ok = (isinstance(run, dict)
                  and run.get("format") == CHECKPOINT_FORMAT
                  and run.get("step") == step
                  and isinstance(run.get("config"), dict)
                  and isinstance(run.get("curve"), list)
                  and os.path.isfile(os.path.join(path, STATE_FILE)))
        except (OSError, ValueError):
            ok = False
        if ok:
            found = {"path": path, "step": step, "config": run["config"],
                     "curve": run["curve"]}
            break
        print(f"note: skipping the incomplete or unreadable checkpoint "
              f"{path}")
    legacy = [os.path.join(directory, name + ext)
              for ext in (".npz", ".json")]
    legacy = [f for f in legacy if os.path.exists(f)]
    if legacy and found is None:
        print(f"note: not resuming from {' and '.join(legacy)}: checkpoints "
              "of an older version of this example, which do not record "
              f"the run's settings; {name} starts over")
    return found


def check_resume(found, args, name):
    """Refuses (exit status 2) a checkpoint written with other settings,
    naming every flag that differs."""
    expected = run_config(args, name)
    saved = found["config"]
    missing = object()

    def show(value):
        return "not set" if value in (None, missing) else repr(value)
    diffs = [f"--{key.replace('_', '-')} {show(saved.get(key, missing))} "
             f"in the checkpoint, {show(expected.get(key, missing))} now"
             for key in dict.fromkeys([*expected, *saved])
             if saved.get(key, missing) != expected.get(key, missing)]
    if diffs:
        print(f"mnist.py: error: --resume: the checkpoint {found['path']} "
              f"was saved by a run with other settings: {'; '.join(diffs)}."
              " Resume with that run's settings, or start over with "
              "another --checkpoint-dir (or without --resume).",
              file=sys.stderr)
        raise SystemExit(2)


def load_checkpoint(found, like):
    """The state and the curve of a checkpoint from :func:`find_checkpoint`."""
    state = gh.load_state(os.path.join(found["path"], STATE_FILE), like=like)
    if int(state.step) != found["step"]:
        raise ValueError(f"{found['path']}: the state is at step "
                         f"{int(state.step)}, its records at step "
                         f"{found['step']}")
    return state, list(found["curve"])


def _record(state, val, grad_evals):
    return _record_at(state.params, state.hyperparams, val, grad_evals)


def _record_at(params, hp, val, grad_evals):
    """A point of a curve: the validation loss of ``params`` and the
    hyperparameters (per layer, the mean of log L2 over its weights)."""
    loss, _ = evaluate(params, val)
    return {"grad_evals": round(float(grad_evals), 3),
            "val_loss": float(loss),
            "log_l2": [float(jnp.mean(r)) for r in hp["log_l2"]],
            "log_lr": float(hp["log_lr"])}


def _plain_step(hp):
    """A jitted plain SGD step at fixed hyperparameters (1 G a step)."""
    tx = inner_optimizer(hp)

    @jax.jit
    def step(p, s, batch):
        g = jax.grad(train_loss)(p, hp, batch)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s
    return tx, step


def train_fixed(params, hp, train, args, steps, val=None, curve=None):
    """Trains with the hyperparameters held fixed, on the data order of the
    gradient-based runs; with ``val``, appends a point to ``curve`` every
    ``--eval-every`` steps (1 G a step)."""
    tx, step = _plain_step(hp)
    p, s = params, tx.init(params)
    for i in range(steps):
        p, s = step(p, s, take(train, batch_indices(
            args.seed, 2 * i, len(train[0]), args.batch_size)))
        if val is not None and ((i + 1) % args.eval_every == 0
                                or i + 1 == steps):
            curve.append(_record_at(p, hp, val, i + 1))
    return p


def random_search(params, train, val, args, budget):
    """Plain SGD on sampled configurations; the best by validation loss."""
    rng = np.random.default_rng(args.seed + 1)
    # the validation pass that ranks a trial: a forward pass per batch
    select = len(val[0]) / (3 * args.batch_size)
    steps = max(1, int(budget / args.random_trials - select))
    best, curve, spent = None, [], 0.0
    for _ in progress(range(args.random_trials), desc="random search",
                      leave=False):
        hp = initial_hyperparams(
            params, args, log_l2=rng.uniform(-10.0, 0.0),
            log_lr=rng.uniform(np.log(1e-3), np.log(0.5)))
        p = train_fixed(params, hp, train, args, steps)
        spent += steps + select
        loss = float(evaluate(p, val)[0])
        if not np.isfinite(loss):
            loss = float("inf")
        if best is None or loss < best[0]:
            best = (loss, p, hp)
        curve.append({"grad_evals": round(spent, 3), "val_loss": best[0],
                      "log_l2": [float(jnp.mean(r)) for r in hp["log_l2"]],
                      "log_lr": float(hp["log_lr"])})
    return best, curve


# -- main ---------------------------------------------------------------------

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
    methods = args.methods.split(",")
    resume = {}
    if args.resume:   # before any work: refuse a mismatched checkpoint now
        for name in TUNED:
            found = (find_checkpoint(args.checkpoint_dir, name)
                     if name in methods else None)
            if found is not None:
                check_resume(found, args, name)
                resume[name] = found
    os.makedirs(args.out, exist_ok=True)
    if args.checkpoint_dir:
        os.makedirs(args.checkpoint_dir, exist_ok=True)
    train, val, test = load_flat_splits(args.data_dir, args.seed,
                                        args.max_train)
    sizes = (train[0].shape[1], args.hidden, args.hidden, 10)
    params = init_mlp(jax.random.PRNGKey(args.seed), sizes)
    hp = initial_hyperparams(params, args)
    # every curve starts here: the common initial weights and
    # hyperparameters, at 0 gradient evaluations
    initial = _record_at(params, hp, val, 0)
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
                               calls, per_call, resume.get(name))
        seconds = time.perf_counter() - start
        vloss, _ = evaluate(state.params, val)
        _, acc = evaluate(state.params, test)
        rows.append((name, float(vloss), float(acc),
                     float(state.metadata["grad_evals"]), seconds,
                     summarize_hp(state.hyperparams)))
        curves[name] = [initial] + curve
    if "untuned" in methods:
        start = time.perf_counter()
        curve = [initial]
        p = train_fixed(params, hp, train, args, args.steps, val, curve)
        vloss, _ = evaluate(p, val)
        rows.append(("untuned", float(vloss), float(evaluate(p, test)[1]),
                     args.steps, time.perf_counter() - start,
                     summarize_hp(hp)))
        curves["untuned"] = curve
    if "random" in methods:
        # the largest budget a tuned method spent, by the library's count
        spent = [r[3] for r in rows if r[0] in TUNED]
        budget = max(spent) if spent else 4 * args.steps
        start = time.perf_counter()
        (loss, p, best_hp), curve = random_search(params, train, val, args,
                                                  budget)
        rows.append(("random search", loss, float(evaluate(p, test)[1]),
                     curve[-1]["grad_evals"], time.perf_counter() - start,
                     summarize_hp(best_hp)))
        curves["random search"] = [initial] + curve
    print_table(rows)
    table = [dict(zip(["method", "val_loss", "test_acc", "grad_evals",
                       "seconds", "hyperparams"], r)) for r in rows]
    write_json(os.path.join(args.out, "results.json"),
               {"args": vars(args), "rows": table, "curves": curves},
               indent=1)
    plot(curves, args)
    print(saved_line(args.out, ["results.json", *PLOTS]))
    if len(table) > 1:
        print(verdict(table, "test_acc", "test accuracy",
                      baselines=BASELINES))
    return rows


def print_table(rows):
    print(f"{'method':<14} {'val loss':>9} {'test acc':>9} {'grad evals':>11}"
          f" {'time [s]':>9}  final hyperparameters")
    for name, vloss, acc, evals, seconds, hp in rows:
        print(f"{name:<14} {vloss:>9.4f} {acc:>9.3f} {evals:>11.0f} "
              f"{seconds:>9.1f}  {hp}")


def plot(curves, args):
    """Writes val_loss.png and hyperparameters.png into ``args.out``.

    One colour per method in every panel (:data:`COLOURS`), a line style per
    layer; every curve starts at 0 gradient evaluations (the initial
    weights and hyperparameters). Each line's ``gid`` is its method (the
    random-search trials: "random search trials"). Returns ``{file name:
    figure}``.
    """
    plt = pyplot()
    from matplotlib.lines import Line2D
    where = dataset_name(args.data_dir)
    labels = {"random search": "random search (best trial so far)",
              "untuned": "untuned (initial hyperparameters, plain SGD)"}
    fig, ax = plt.subplots(figsize=(7, 4.8), layout="constrained")
    for name, curve in curves.items():
        x = [c["grad_evals"] for c in curve]
        y = [c["val_loss"] for c in curve]
        if name == "random search":
            ax.step(x, y, where="post", color=COLOURS[name],
                    label=labels[name], gid=name)
            ax.plot(x[1:], y[1:], ls="", marker=MARKERS[name], ms=4,
                    color=COLOURS[name], gid=f"{name} trials")
        else:
            ax.plot(x, y, color=COLOURS[name], marker=MARKERS[name], ms=3,
                    label=labels.get(name, name), gid=name)
    ax.set(xlabel="gradient evaluations (G)",
           ylabel="validation loss (cross-entropy)", yscale="log",
           title=f"MLP on {where}: validation loss while tuning\n"
                 "the L2 penalties and the learning rate")
    ax.grid(alpha=0.3)
    legend_below(fig, ncol=2)
    fig.savefig(os.path.join(args.out, PLOTS[0]), dpi=120)
    figures = {PLOTS[0]: fig}

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), layout="constrained")
    styles = ("-", "--", ":", "-.")
    layers = 0
    for i, (name, curve) in enumerate(curves.items()):
        evals = [c["grad_evals"] for c in curve]
        width = max(0.8, 2.6 - 0.5 * i)   # later lines thinner: both show
        if name == "random search":       # its sampled configurations
            trials = curve[1:]
            x = [c["grad_evals"] for c in trials]
            for layer in range(len(trials[0]["log_l2"])):
                axes[0].plot(x, [math.exp(c["log_l2"][layer])
                                 for c in trials],
                             ls="", marker=MARKERS[name], ms=4, mfc="none",
                             color=COLOURS[name], gid=f"{name} trials")
            axes[1].plot(x, [math.exp(c["log_lr"]) for c in trials], ls="",
                         marker=MARKERS[name], ms=4, mfc="none",
                         color=COLOURS[name], gid=f"{name} trials")
            continue
        layers = max(layers, len(curve[0]["log_l2"]))
        for layer in range(len(curve[0]["log_l2"])):
            axes[0].plot(evals, [math.exp(c["log_l2"][layer])
                                 for c in curve],
                         ls=styles[layer % len(styles)], lw=width,
                         color=COLOURS[name], gid=name)
        axes[1].plot(evals, [math.exp(c["log_lr"]) for c in curve],
                     lw=width, color=COLOURS[name], gid=name)
    l2 = ("L2 penalty (geometric mean over the layer's weights)"
          if args.per_weight else "L2 penalty")
    axes[0].set(xlabel="gradient evaluations (G)", ylabel=l2,
                yscale="log", title="L2 penalty of each layer")
    axes[1].set(xlabel="gradient evaluations (G)",
                ylabel="learning rate (SGD, momentum 0.9)", yscale="log",
                title="learning rate")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"MLP on {where}: hyperparameters during tuning "
                 "(every curve starts at the initial values)")
    handles, names = [], []
    for name in curves:
        if name == "random search":
            handles.append(Line2D([], [], color=COLOURS[name], ls="",
                                  marker=MARKERS[name], mfc="none"))
            names.append("random search (sampled configurations)")
        else:
            handles.append(Line2D([], [], color=COLOURS[name], lw=2))
            names.append(labels.get(name, name))
    handles += [Line2D([], [], color="grey", ls=styles[k % len(styles)])
                for k in range(layers)]
    names += [f"layer {k + 1}" for k in range(layers)]
    legend_below(fig, handles, names, ncol=4)
    fig.savefig(os.path.join(args.out, PLOTS[1]), dpi=120)
    figures[PLOTS[1]] = fig
    plt.close("all")
    return figures


if __name__ == "__main__":
    main()
