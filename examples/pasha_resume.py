r"""Pausing PASHA with one-shot warm starts: an Optuna study that pauses and
resumes trials, on the MNIST test split (or scikit-learn's digits).

**What runs.** An Optuna study tunes three hyperparameters of a one-hidden-
layer MLP trained with SGD (momentum 0.9, batch ``--batch-size``): the
learning rate (log-uniform in [1e-3, 0.3]) and one coupled L2 penalty per
layer (``l2_hidden``, ``l2_out``, log-uniform in [1e-6, 1e-1]). Every
configuration starts from the same initial weights (seeded by ``--seed``)
and sees the same batches in the same order (common random numbers). The
resource is counted in *units*: unit :math:`e = 1, 2, \dots, R` is
``--steps-per-unit`` SGD steps, after which the validation accuracy is
reported at resource :math:`e` (maximised). Rungs sit at :math:`1, \eta,
\eta^2, \dots < R` (:math:`\eta` = ``--eta``, :math:`R` =
``--max-resource``).

Three studies (rows; ``--methods`` picks a subset) share the search space,
the sampler (Optuna's ``RandomSampler`` seeded by ``--seed``, so with one
worker the k-th new configuration is the same in every study) and the
budget:

- ``pausing``: :class:`gradhpo.PausingScheduler` with ``kind="pasha"``
  run through :class:`gradhpo.ResumableObjective`: a configuration that is
  not promoted at a rung is *paused* (its state checkpointed with
  :func:`gradhpo.save_state`) and resumed from that checkpoint when it is
  promoted later, e.g. after PASHA raises its maximum resource. A
  configuration is a *chain* of Optuna trials, and no unit is trained twice.
- ``stopping``: PASHA as a pruner,
  :class:`gradhpo.integrations.pasha.PASHAPruner`, which *stops* trials
  instead of pausing them. Of the two stopping pruners at hand it is the
  closer baseline: it grows its maximum resource with the same soft-ranking
  test between the top two rungs, whereas Optuna's
  ``SuccessiveHalvingPruner`` is ASHA (the maximum resource is :math:`R`
  from the start), so the comparison isolates pausing. Steps are reported
  1-based, so its rungs are exactly the pausing scheduler's. Below the top
  rung it decides when a trial arrives (Optuna's ASHA rule) instead of
  promoting the best paused trial, and a trial stopped at the top rung is
  never continued when the top rung grows: that is what pausing changes.
- ``pausing-cold``: ``pausing`` without the warm start (the ablation; left
  out with ``--no-warm-start``, when ``pausing`` is cold too).

**Warm start** (``--warm-start``, on by default). Before its first unit,
each new configuration takes one :class:`gradhpo.OneShotWarmStart` step on
its sampled hyperparameters: :math:`\psi' = \Pi(\psi - \eta_h \nabla_\psi
J(\psi))`, with :math:`\psi` the log hyperparameters, :math:`J` the
validation cross-entropy on ``--batch-size`` validation examples after
``--ws-lookahead`` SGD steps from the common initial weights on the first
training batches, :math:`\eta_h` = ``--ws-step-size`` and :math:`\Pi` the
clip into the search box. The configuration then trains with
:math:`\psi'` (kept in its checkpoint, so a resumed segment trains the
same :math:`\psi'`); ``trial.params`` keep the sampled :math:`\psi`, and
the user attribute ``warm_start`` of the configuration's first trial holds
:math:`\psi'`, :math:`\nabla_\psi J`, :math:`J` and the cost. A
continuation does not warm-start again.

**Cost and the comparison.** G counts gradient evaluations: one SGD step
on one batch is 1 G (a unit is ``--steps-per-unit`` G) and a warm start
costs what ``OneShotWarmStart`` charged in ``metadata["grad_evals"]``.
Evaluations are not charged. Each study runs until it has spent
``--budget`` units' worth of G (checked between trials, so a study
overshoots by at most one trial); the studies are then compared at the
common horizon :math:`H`, the smallest total G among them: every number in
the table counts only the work done (in time order) until :math:`H`. The
test accuracy is measured after every unit too, but never used to select;
the
*incumbent* of a study is the (configuration, unit) with the best
validation accuracy within :math:`H`; the table shows its validation and
test accuracy, the units trained, the configurations started and PASHA's
top rung :math:`T` (maximum resource :math:`M`) within :math:`H`. The
whole-study totals (every unit trained once, :math:`T` as
``current_top_rung`` reads the journal) follow the table.

**Data.** With ``--data-dir`` (or, without ``--quick``, when
``../shared/data/mnist`` next to the repository holds MNIST IDX files):
MNIST read by ``data_utils.load_mnist_splits(dir, val_fraction=0.1,
test_fraction=0.2, seed=--seed)``. When only the 10,000 test images are
there (``t10k-*``), they are split, stratified by digit and seeded by
``--seed``, into 7,000 train / 1,000 validation / 2,000 test; with the full
MNIST the 60,000 training images are split 54,000 / 6,000 and ``t10k`` is
the test set. Otherwise (and with ``--quick`` unless ``--data-dir`` is
given): scikit-learn's digits, split 1,079 / 359 / 359 the same way. Pixels
are standardised with the training split's statistics.

**Files** in ``--out``: ``study.journal`` (an Optuna ``JournalStorage``
holding all studies; run the same command again, e.g. with a larger
``--budget``, and it continues them: paused chains resume from the
checkpoints in ``checkpoints/``; a pausing segment killed mid-way is
retried from its chain's last checkpoint, so only its units since that
pause are trained again; settings that change the training are refused),
``results.json`` (every row, its whole-study totals and every chain's
segments and curve) and ``curves.png`` (every
chain's validation accuracy against resource units and against the study's
G clock, a circle at each pause and a dotted line to where it resumed).
``--workers N`` runs each study with N processes (multiprocessing, spawn)
on the journal; with several workers the configurations are no longer
paired across studies.

Examples::

    python examples/pasha_resume.py --quick          # digits, ~30 s
    python examples/pasha_resume.py                  # MNIST test split
    python examples/pasha_resume.py --budget 400     # continue the study
    python examples/pasha_resume.py --workers 2 --out runs/pasha2
"""

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from cli import (add_common_flags, fill_defaults, legend_below,  # noqa: E402
                 name_list, positive_float, positive_int, progress, pyplot,
                 quick_help, saved_line, verdict, write_json)

METHODS = ("pausing", "stopping", "pausing-cold")
#: MNIST next to the repository (only the test files on most machines).
DEFAULT_DATA_DIR = os.path.join(ROOT, "..", "shared", "data", "mnist")
NORMAL = dict(budget=240, max_resource=27, steps_per_unit=20, hidden=128,
              batch_size=64)
QUICK = dict(budget=40, max_resource=9, steps_per_unit=10, hidden=32,
             batch_size=32)
#: The search space: (low, high) of each log-uniform hyperparameter.
SPACE = {"lr": (1e-3, 0.3), "l2_hidden": (1e-6, 1e-1),
         "l2_out": (1e-6, 1e-1)}
MOMENTUM = 0.9


def build_parser():
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (python -c 'import pasha_resume; "
        "help(pasha_resume)' in examples/) for the cost unit and the "
        "comparison.")
    p.add_argument("--data-dir",
                   help="MNIST IDX files (only the t10k test files are "
                   "enough: they are split 7000/1000/2000); default "
                   "../shared/data/mnist next to the repository when it "
                   "exists (not with --quick), else scikit-learn digits")
    p.add_argument("--digits", action="store_true",
                   help="use scikit-learn's digits even if MNIST is found")
    p.add_argument("--methods", type=name_list(METHODS),
                   default=",".join(METHODS),
                   help="comma-separated studies to run, from "
                   f"{', '.join(METHODS)} (default all)")
    p.add_argument("--warm-start", action=argparse.BooleanOptionalAction,
                   default=True,
                   help="one OneShotWarmStart step per new configuration "
                   "in the pausing and stopping studies (default on; "
                   "--no-warm-start drops the pausing-cold row)")
    p.add_argument("--budget", type=positive_int,
                   help="per study, in units of --steps-per-unit G "
                   f"(default {NORMAL['budget']}); a rerun with a larger "
                   "budget continues the studies in --out")
    p.add_argument("--max-resource", type=positive_int,
                   help=f"R, units of a complete configuration (default "
                   f"{NORMAL['max_resource']})")
    p.add_argument("--eta", type=positive_int, default=3,
                   help="reduction factor: rungs at 1, eta, eta^2, ... < R "
                   "(default 3)")
    p.add_argument("--steps-per-unit", type=positive_int,
                   help="SGD steps in one resource unit (default "
                   f"{NORMAL['steps_per_unit']})")
    p.add_argument("--batch-size", type=positive_int,
                   help=f"default {NORMAL['batch_size']}")
    p.add_argument("--hidden", type=positive_int,
                   help=f"hidden units of the MLP (default "
                   f"{NORMAL['hidden']})")
    p.add_argument("--ws-step-size", type=positive_float, default=0.3,
                   help="eta_h of the warm start, in log-hyperparameter "
                   "units per unit of gradient (default 0.3)")
    p.add_argument("--ws-lookahead", type=positive_int, default=1,
                   help="SGD steps K of the warm start's lookahead "
                   "(default 1)")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="processes per study, sharing the journal (default "
                   "1)")
    add_common_flags(
        p, out="runs/pasha_resume",
        seed_help="random seed: data split, initial weights, batch order, "
        "sampler",
        quick=quick_help("a small run on digits for tests (well under a "
                         "minute)", NORMAL, QUICK))
    return p


def parse_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    fill_defaults(args, NORMAL, QUICK)
    if args.max_resource < 2:
        p.error("--max-resource must be at least 2 (one rung below R)")
    if args.eta < 2:
        p.error("--eta must be at least 2")
    if args.data_dir is None and not (args.quick or args.digits) and \
            has_mnist(DEFAULT_DATA_DIR):
        args.data_dir = os.path.normpath(DEFAULT_DATA_DIR)
    if args.digits:
        args.data_dir = None
    methods = args.methods.split(",")
    if not args.warm_start and "pausing-cold" in methods:
        methods.remove("pausing-cold")
        if not methods:
            p.error("--no-warm-start leaves no study to run: pausing-cold "
                    "equals pausing then; choose pausing or stopping")
    args.method_list = methods
    return args


def has_mnist(path):
    return os.path.isdir(path) and any(
        name.startswith(("t10k-images", "train-images"))
        for name in os.listdir(path))


if __name__ == "__main__":
    parse_args()    # --help and usage errors before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optuna  # noqa: E402
from jax import lax  # noqa: E402

import gradhpo as gh  # noqa: E402
from gradhpo.integrations import resume  # noqa: E402
from gradhpo.integrations.pasha import PASHADecision, PASHAPruner  # noqa
from gradhpo.utils import gradients as gr  # noqa: E402

import data_utils  # noqa: E402  (the examples' data loaders)

#: User attributes this example writes on the trial that trained a unit:
#: ``unit:E`` = [seconds since the study began, test accuracy, T after the
#: report], and ``warm_start`` on the trial that ran the warm start.
UNIT = "unit:"
WARM = "warm_start"


# -- the task -----------------------------------------------------------------

class Task:
    """Data, model and compiled functions, shared by every study."""

    def __init__(self, args):
        if args.data_dir:
            splits = data_utils.load_mnist_splits(
                args.data_dir, val_fraction=0.1, test_fraction=0.2,
                seed=args.seed)
            self.dataset = ("MNIST test split" if splits.test_only
                            else "MNIST")
        else:
            splits = data_utils.load_digits_splits(seed=args.seed)
            self.dataset = "scikit-learn digits"
        self.source, self.note = splits.source, splits.note
        flat = [x.reshape(len(x), -1).astype(np.float32)
                for x in (splits.train[0], splits.val[0], splits.test[0])]
        xtr, xva, xte = data_utils.standardize(*flat)
        self.sizes = {"train": len(xtr), "val": len(xva), "test": len(xte)}
        self.train = (jnp.asarray(xtr), jnp.asarray(splits.train[1],
                                                    jnp.int32))
        self.val = (jnp.asarray(xva), jnp.asarray(splits.val[1], jnp.int32))
        self.test = (jnp.asarray(xte), jnp.asarray(splits.test[1],
                                                   jnp.int32))
        self.args = args
        self.spu = args.steps_per_unit
        b = args.batch_size
        n = len(xtr)
        if n < b:
            raise SystemExit(f"pasha_resume.py: error: --batch-size {b} is "
                             f"larger than the {n} training examples")
        # the batch order of every configuration: seeded epochs
        steps = args.max_resource * self.spu
        per_epoch = n // b
        rng = np.random.default_rng([args.seed, 0])
        epochs = -(-steps // per_epoch)
        order = np.concatenate([rng.permutation(n)[:per_epoch * b]
                                for _ in range(epochs)])
        self.order = jnp.asarray(order[:steps * b].reshape(steps, b))
        k = args.ws_lookahead
        if k > steps:
            raise SystemExit("pasha_resume.py: error: --ws-lookahead is "
                             "longer than a whole configuration")
        first = self.order[:k]
        self.ws_train = (self.train[0][first], self.train[1][first])
        if k == 1:
            self.ws_train = jax.tree.map(lambda x: x[0], self.ws_train)
        v = np.random.default_rng([args.seed, 1]).choice(
            len(xva), min(b, len(xva)), replace=False)
        self.ws_val = (self.val[0][v], self.val[1][v])
        shapes = (xtr.shape[1], args.hidden, 10)
        keys = jax.random.split(jax.random.PRNGKey(args.seed), 2)
        self.params0 = [
            {"w": jax.random.normal(key, (m, o)) * np.sqrt(2.0 / m),
             "b": jnp.zeros(o)}
            for key, m, o in zip(keys, shapes, shapes[1:])]
        self.inner = inner_optimizer
        self.train_unit = jax.jit(self._train_unit)
        self.accuracy = jax.jit(accuracy)
        lo = {n: math.log(a) for n, (a, _) in SPACE.items()}
        hi = {n: math.log(z) for n, (_, z) in SPACE.items()}
        self.warm = gh.OneShotWarmStart(
            train_loss, val_loss, inner_optimizer,
            step_size=args.ws_step_size, lookahead=k, bounds=(lo, hi))

    def _train_unit(self, params, opt_state, hp, idx, x, y):
        def body(carry, i):
            out = gr.guard_inner_step(
                gr.inner_step(train_loss, inner_optimizer, carry[0],
                              carry[1], hp, (x[i], y[i])), *carry)
            return (out.params, out.opt_state), out.loss
        return lax.scan(body, (params, opt_state), idx)[0]

    def fresh_state(self, hp):
        """The state before unit 1: everything a segment needs to go on."""
        return {"params": self.params0,
                "opt_state": gr.init_inner_state(self.inner, self.params0,
                                                 hp),
                "hp": hp, "e": np.asarray(0, np.int32)}

    def warm_start(self, sampled):
        """One OneShotWarmStart step: (psi' values, record)."""
        psi = coordinates(sampled)
        state = self.warm.init(self.params0, psi)
        new = self.warm.step(state, self.ws_train, self.ws_val)
        new_psi, meta, own = jax.device_get(
            (new.hyperparams, new.metadata, new.algorithm_state))
        spent = float(meta["grad_evals"]) - float(
            state.metadata["grad_evals"])
        trained = {n: float(math.exp(float(new_psi[n]))) for n in SPACE}
        return trained, {
            "grad_evals": spent, "trained": trained,
            "hypergradient": {n: float(own.hypergradient[n])
                              for n in SPACE},
            "val_loss": float(meta["val_loss"])}

    def unit(self, state, e):
        """Trains unit ``e``; returns (state, val acc, test acc)."""
        if int(state["e"]) != e - 1:
            raise RuntimeError(f"state is at unit {int(state['e'])}, asked "
                               f"to train unit {e}")
        idx = self.order[(e - 1) * self.spu:e * self.spu]
        params, opt_state = self.train_unit(
            state["params"], state["opt_state"], state["hp"], idx,
            *self.train)
        new = {"params": params, "opt_state": opt_state, "hp": state["hp"],
               "e": np.asarray(e, np.int32)}
        return (new, float(self.accuracy(params, *self.val)),
                float(self.accuracy(params, *self.test)))


def logits(params, x):
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def train_loss(params, hp, batch):
    x, y = batch
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits(params, x), y).mean()
    penalty = (jnp.exp(hp["l2_hidden"]) * jnp.sum(params[0]["w"] ** 2)
               + jnp.exp(hp["l2_out"]) * jnp.sum(params[1]["w"] ** 2))
    return ce + 0.5 * penalty


def val_loss(params, hp, batch):
    del hp
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(
        logits(params, x), y).mean()


def inner_optimizer(hp):
    return optax.sgd(jnp.exp(hp["lr"]), momentum=MOMENTUM)


def accuracy(params, x, y):
    return jnp.mean(jnp.argmax(logits(params, x), -1) == y)


def coordinates(values):
    return {n: jnp.asarray(math.log(values[n]), jnp.float32) for n in SPACE}


def suggest(trial):
    return {n: trial.suggest_float(n, lo, hi, log=True)
            for n, (lo, hi) in SPACE.items()}


# -- the studies --------------------------------------------------------------

def scheduler_for(args):
    return gh.PausingScheduler(1, args.eta, max_resource=args.max_resource,
                               kind="pasha")


def pruner_for(args):
    return PASHAPruner(min_resource=1, reduction_factor=args.eta,
                       max_resource=args.max_resource)


def is_pausing(method):
    return method.startswith("pausing")


def uses_warm_start(method, args):
    return args.warm_start and method != "pausing-cold"


def study_name(method):
    return f"pasha-{method}"


def open_storage(out):
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    return JournalStorage(JournalFileBackend(os.path.join(out,
                                                          "study.journal")))


#: The settings a study must keep when a later run continues it.
FIXED = ("seed", "data_dir", "max_resource", "eta", "steps_per_unit",
         "batch_size", "hidden", "warm_start", "ws_step_size",
         "ws_lookahead")


def create_studies(args, storage):
    """Creates the studies in the journal, or checks that the studies
    already there were run with the same settings (then this run continues
    them)."""
    config = {k: getattr(args, k) for k in FIXED}
    if config["data_dir"]:
        config["data_dir"] = os.path.abspath(config["data_dir"])
    for method in args.method_list:
        study = optuna.create_study(
            storage=storage, study_name=study_name(method),
            direction="maximize", load_if_exists=True)
        old = study.user_attrs.get("config")
        if old is None:
            study.set_user_attr("config", config)
            study.set_user_attr("t0", time.time())
        elif old != config:
            diff = ", ".join(f"--{k.replace('_', '-')} {old.get(k)} (now "
                             f"{config[k]})" for k in FIXED
                             if old.get(k) != config[k])
            journal = os.path.join(args.out, "study.journal")
            raise SystemExit(f"pasha_resume.py: error: {journal} holds "
                             f"study {study.study_name} run with {diff}; "
                             "use those settings or another --out")


def open_study(method, args, storage, worker=0):
    """A study :func:`create_studies` made, with this run's sampler: a
    fresh seed for every run and worker (the first run of worker 0 on an
    empty study uses the same one in every study)."""
    study = optuna.load_study(
        study_name=study_name(method), storage=storage,
        pruner=None if is_pausing(method) else pruner_for(args))
    seed = int(np.random.SeedSequence(
        [args.seed, worker, len(study.trials)]).generate_state(1)[0])
    study.sampler = optuna.samplers.RandomSampler(seed=seed)
    return study


def record_unit(trial, t0, e, test, top):
    trial.set_user_attr(f"{UNIT}{e}", [time.time() - t0, test, int(top)])


def prepare(task, trial, method, args, t0):
    """Samples (or reads) the configuration; warm-starts it when the study
    uses warm starts. Returns the state before unit 1."""
    sampled = suggest(trial)
    values = sampled
    if uses_warm_start(method, args):
        values, record = task.warm_start(sampled)
        record["time"] = time.time() - t0
        trial.set_user_attr(WARM, record)
    return task.fresh_state(coordinates(values))


def pausing_objective(task, study, method, args):
    t0 = study.user_attrs["t0"]
    sched = scheduler_for(args)
    tests = {}

    def init(trial):
        chain = trial.user_attrs[resume.CHAIN]
        path = objective.checkpoint_path(trial.study, chain)
        if trial.user_attrs.get(resume.PARENT) is None or \
                not os.path.exists(path):
            return prepare(task, trial, method, args, t0)
        # a continuation: a template that the checkpoint overwrites
        return task.fresh_state(coordinates(suggest(trial)))

    def step(trial, state, e):
        state, val, tests[trial.number] = task.unit(state, e)
        return state, val

    def on_report(trial, e, value, max_resource):
        record_unit(trial, t0, e, tests.pop(trial.number),
                    top_of(sched, max_resource))

    objective = gh.ResumableObjective(
        init, step, sched,
        checkpoint_dir=os.path.join(args.out, "checkpoints"),
        on_report=on_report)
    return objective


def top_of(sched, max_resource):
    """T for the maximum resource M."""
    if max_resource >= sched.max_resource:
        return sched.n_rungs
    return sched.rung_levels.index(max_resource)


def stopping_objective(task, study, method, args):
    t0 = study.user_attrs["t0"]
    pruner = study.pruner

    def objective(trial):
        state = prepare(task, trial, method, args, t0)
        value = math.nan
        for e in range(1, args.max_resource + 1):
            state, value, test = task.unit(state, e)
            trial.report(value, e)
            stop = trial.should_prune()
            record_unit(trial, t0, e, test, pruner.current_top_rung(study))
            if stop and e < args.max_resource:
                if pruner.last_decision(trial.number) is \
                        PASHADecision.STOP_AT_MAX:
                    return value
                raise optuna.TrialPruned()
        return value
    return objective


def spent(study, spu):
    """Gradient evaluations the study has spent (units and warm starts)."""
    total = 0.0
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        total += spu * sum(k.startswith(UNIT) for k in attrs)
        if WARM in attrs:
            total += attrs[WARM]["grad_evals"]
    return total


def run_study(task, method, args, storage, worker=0, bar=None, done=0.0):
    """One worker's share of a study: trials until the budget is spent."""
    study = open_study(method, args, storage, worker)
    if is_pausing(method):
        objective = pausing_objective(task, study, method, args)
        objective.recover(study)    # segments of a killed run: retried
    else:
        objective = stopping_objective(task, study, method, args)
    budget = args.budget * args.steps_per_unit
    while True:
        used = spent(study, args.steps_per_unit)
        if bar is not None:
            bar.n = round(done + min(used, budget) / args.steps_per_unit, 1)
            bar.set_postfix(study=method, trials=len(study.trials))
        if used >= budget:
            return study
        study.optimize(objective, n_trials=1)


def worker_main(argv, index):
    """A spawned worker: the same studies, on the same journal."""
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = Task(args)
    storage = open_storage(args.out)
    for method in args.method_list:
        run_study(task, method, args, storage, worker=index)


# -- analysis -----------------------------------------------------------------

def events_of(study, method, spu):
    """Every unit trained and every warm start, in time order: dicts with
    time, G, kind, chain, trial, e, val, test, top."""
    events = []
    for t in study.get_trials(deepcopy=False):
        chain = t.user_attrs.get(resume.CHAIN, t.number) \
            if is_pausing(method) else t.number
        attrs = t.user_attrs
        if WARM in attrs:
            events.append(dict(time=attrs[WARM]["time"],
                               G=attrs[WARM]["grad_evals"], kind="warm",
                               chain=chain, trial=t.number, e=0))
        for key, rec in attrs.items():
            if not key.startswith(UNIT):
                continue
            e = int(key[len(UNIT):])
            events.append(dict(time=rec[0], G=float(spu), kind="unit",
                               chain=chain, trial=t.number, e=e,
                               val=t.intermediate_values[e], test=rec[1],
                               top=rec[2]))
    events.sort(key=lambda ev: (ev["time"], ev["trial"], ev["e"]))
    clock = 0.0
    for ev in events:
        clock += ev["G"]
        ev["clock"] = clock
    return events


def summary(events, sched):
    """Units, configurations, T and the incumbent of a list of events."""
    units = [ev for ev in events if ev["kind"] == "unit"]
    best = None
    for ev in units:
        if best is None or ev["val"] > best["val"]:
            best = ev
    top = max([1] + [ev["top"] for ev in units])
    return {
        "grad_evals": events[-1]["clock"] if events else 0.0,
        "warm_start_grad_evals": sum(ev["G"] for ev in events
                                     if ev["kind"] == "warm"),
        "units": len(units),
        "configurations": len({ev["chain"] for ev in events}),
        "top_rung": top, "max_resource": sched.max_resource_for(top),
        "highest_unit": max([0] + [ev["e"] for ev in units]),
        "best_val_acc": None if best is None else best["val"],
        "test_acc": None if best is None else best["test"],
        "incumbent": None if best is None else {
            "chain": best["chain"], "unit": best["e"],
            "trial": best["trial"]},
    }


def chains_of(study, method, events, args):
    """Per configuration: its segments and its curve (one point per unit,
    with the study's G clock when it was trained)."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    points = {}
    for ev in events:
        if ev["kind"] == "unit":
            points.setdefault(ev["chain"], []).append(
                [ev["e"], ev["val"], ev["clock"], ev["trial"]])
    out = []
    for chain, curve in sorted(points.items()):
        curve.sort()
        head = trials[chain]
        segments = []
        for e, _, _, number in curve:
            if not segments or segments[-1]["trial"] != number:
                t = trials[number]
                segments.append({
                    "trial": number, "first": e, "last": e,
                    "start": t.user_attrs.get(resume.START, 0),
                    "status": t.user_attrs.get(resume.STATUS, t.state.name
                                               .lower())})
            segments[-1]["last"] = e
        for seg in segments:   # PASHAPruner's finalists below R
            if seg["status"] == "complete" and \
                    seg["last"] < args.max_resource:
                seg["status"] = "stopped"
        warm = head.user_attrs.get(WARM)
        out.append({
            "chain": chain, "sampled": dict(head.params),
            "trained": warm["trained"] if warm else dict(head.params),
            "segments": segments, "curve": curve,
            "complete": curve[-1][0] == args.max_resource,
            "pauses": sum(s["status"] == "paused" for s in segments),
            "resumes": len(segments) - 1})
    return out


def analyse(studies, args):
    sched = scheduler_for(args)
    data = {}
    for method, study in studies.items():
        events = events_of(study, method, args.steps_per_unit)
        chains = chains_of(study, method, events, args)
        whole = summary(events, sched)
        if is_pausing(method):
            top = sched.current_top_rung(study)
            whole["segments"] = sum(len(c["segments"]) for c in chains)
        else:
            top = study.pruner.current_top_rung(study)
            whole["segments"] = len(chains)
        whole.update(
            top_rung=top, max_resource=sched.max_resource_for(top),
            units_trained=whole.pop("units"),
            distinct_units=sum(len({p[0] for p in c["curve"]})
                               for c in chains),
            pauses_resumed=sum(c["resumes"] for c in chains),
            complete=sum(c["complete"] for c in chains))
        data[method] = (events, chains, whole)
    horizon = min(whole["grad_evals"] for _, _, whole in data.values())
    rows = []
    for method, (events, chains, whole) in data.items():
        within = [ev for ev in events if ev["clock"] <= horizon + 1e-9]
        row = {"method": method,
               "scheduler": ("pausing PASHA (PausingScheduler)"
                             if is_pausing(method) else
                             "stopping PASHA (PASHAPruner)"),
               "warm_start": uses_warm_start(method, args),
               "study": studies[method].study_name,
               **summary(within, sched), "whole_study": whole,
               "chains": chains}
        rows.append(row)
    return horizon, rows


# -- output -------------------------------------------------------------------

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def print_table(horizon, rows, args):
    print(f"\nAt the common budget H = {horizon:.0f} G (1 unit = "
          f"{args.steps_per_unit} G; warm starts charged; each study's "
          "work counted in time order up to H); incumbent = best "
          "validation accuracy so far")
    head = (f"{'study':<14}{'warm':>5}{'G':>8}{'units':>7}{'configs':>8}"
            f"{'T (M)':>8}{'best val':>10}{'test acc':>10}")
    print(head)
    print("-" * len(head))
    for r in rows:
        top = f"{r['top_rung']} ({r['max_resource']})"
        print(f"{r['method']:<14}{'yes' if r['warm_start'] else 'no':>5}"
              f"{r['grad_evals']:>8.0f}{r['units']:>7}"
              f"{r['configurations']:>8}{top:>8}"
              f"{fmt(r['best_val_acc'], '.4f'):>10}"
              f"{fmt(r['test_acc'], '.4f'):>10}")
    print("\nWhole studies (every unit, until each study's own end):")
    for r in rows:
        w = r["whole_study"]
        twice = w["units_trained"] - w["distinct_units"]
        print(f"  {r['method']}: {w['units_trained']} units trained "
              f"({'none' if twice == 0 else twice} twice), "
              f"{w['grad_evals']:.0f} G ({w['warm_start_grad_evals']:.0f} "
              f"in warm starts), {w['configurations']} configurations in "
              f"{w['segments']} trials, {w['pauses_resumed']} resumed "
              f"after a pause, {w['complete']} reached R = "
              f"{args.max_resource}; top rung T = {w['top_rung']} "
              f"(M = {w['max_resource']})")


MARKERS = {"paused": dict(marker="o", mfc="none", ms=5),
           "pruned": dict(marker="x", ms=5),
           "stopped": dict(marker="s", mfc="none", ms=5),
           "complete": dict(marker="*", ms=9)}


def plot(horizon, rows, task, args, path):
    """Each chain's validation accuracy against resource units (left) and
    against the study's G clock (right); one row of panels per study."""
    plt = pyplot()
    from matplotlib.lines import Line2D
    cmap = plt.get_cmap("tab20")
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 3.2 * len(rows)),
                             squeeze=False, layout="constrained")
    sched = scheduler_for(args)
    for (ax_r, ax_g), row in zip(axes, rows):
        for k, chain in enumerate(row["chains"]):
            colour = cmap(k % 20)
            curve = chain["curve"]
            for i, seg in enumerate(chain["segments"]):
                pts = [p for p in curve if seg["first"] <= p[0] <= seg["last"]
                       and p[3] == seg["trial"]]
                es, vs, gs = ([p[j] for p in pts] for j in range(3))
                style = dict(color=colour, lw=0.9, alpha=0.8)
                if len(pts) == 1:
                    style.update(marker=".", ms=3)
                ax_r.plot(es, vs, "-", **style)
                ax_g.plot(gs, vs, "-", **style)
                end = MARKERS.get(seg["status"])
                if end is not None:
                    for ax, x in ((ax_r, es[-1]), (ax_g, gs[-1])):
                        ax.plot([x], [vs[-1]], ls="none", color=colour,
                                **end)
                if i + 1 < len(chain["segments"]):   # resumed later
                    nxt = next(p for p in curve if p[3] ==
                               chain["segments"][i + 1]["trial"])
                    ax_r.plot([es[-1], nxt[0]], [vs[-1], nxt[1]], ":",
                              color=colour, lw=1.1)
                    ax_g.plot([gs[-1], nxt[2]], [vs[-1], nxt[1]], ":",
                              color=colour, lw=1.1)
        for level in sched.rung_levels:
            ax_r.axvline(level, color="0.8", lw=0.8, zorder=0)
        ax_r.set_xscale("log", base=args.eta)
        ticks = sched.rung_levels + [args.max_resource]
        ax_r.set_xticks(ticks, [str(t) for t in ticks])
        ax_r.set(xlabel=f"resource: units trained (1 unit = "
                 f"{args.steps_per_unit} SGD steps)",
                 ylabel="validation accuracy",
                 title=f"{row['method']}: {row['scheduler']}"
                 f"{', warm start' if row['warm_start'] else ''}")
        ax_g.axvline(horizon, color="k", ls="--", lw=0.8)
        ax_g.set(xlabel="study clock: G spent by the study (dashed: H)",
                 ylabel="validation accuracy",
                 title=f"{row['method']}: the same curves in study time")
    fig.suptitle(f"PASHA with pause and resume on {task.dataset}: one "
                 "colour per configuration (the same in every row)")
    handles = [Line2D([], [], color="0.3", lw=1),
               Line2D([], [], color="0.3", ls=":", lw=1.1),
               Line2D([], [], color="0.3", ls="none", **MARKERS["paused"]),
               Line2D([], [], color="0.3", ls="none", **MARKERS["pruned"]),
               Line2D([], [], color="0.3", ls="none", **MARKERS["stopped"]),
               Line2D([], [], color="0.3", ls="none",
                      **MARKERS["complete"])]
    labels = ["trained in one trial", "paused, then resumed",
              "paused (checkpointed)", "pruned (lost at a rung)",
              "stopped at PASHA's top rung", f"complete (R = "
              f"{args.max_resource})"]
    legend_below(fig, handles, labels, ncol=6)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ---------------------------------------------------------------------

def verdict_line(rows):
    spec = [{"method": r["method"], "test_acc": r["test_acc"],
             "grad_evals": r["grad_evals"]} for r in rows
            if r["test_acc"] is not None]
    if len(spec) < 2:
        return None
    return verdict(spec, "test_acc", "the test accuracy of the incumbent "
                   "within the common budget", spec=".4f",
                   note="one seed: rerun with other --seed values before "
                   "trusting a small margin")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.makedirs(os.path.join(args.out, "checkpoints"), exist_ok=True)
    start = time.perf_counter()
    storage = open_storage(args.out)
    create_studies(args, storage)
    task = Task(args)
    print(task.source)
    if task.note:
        print(task.note)
    procs = []
    if args.workers > 1:
        ctx = __import__("multiprocessing").get_context("spawn")
        for i in range(1, args.workers):
            proc = ctx.Process(target=worker_main, args=(argv, i))
            proc.start()
            procs.append(proc)
    bar = progress(total=args.budget * len(args.method_list), unit="unit",
                   desc="units")
    studies = {}
    for i, method in enumerate(args.method_list):
        studies[method] = run_study(task, method, args, storage, bar=bar,
                                    done=i * args.budget)
    bar.close()
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise SystemExit(f"pasha_resume.py: worker {proc.name} failed "
                             f"(exit code {proc.exitcode})")
    # read back from the journal: every worker's trials
    studies = {m: open_study(m, args, storage) for m in args.method_list}
    horizon, rows = analyse(studies, args)
    print_table(horizon, rows, args)
    plot(horizon, rows, task, args, os.path.join(args.out, "curves.png"))
    line = verdict_line(rows)
    result = {
        "data": {"dataset": task.dataset, "source": task.source,
                 "note": task.note, "sizes": task.sizes},
        "args": {k: v for k, v in vars(args).items()},
        "cost_unit": f"G = one SGD step on one batch of {args.batch_size} "
        f"(1 unit = {args.steps_per_unit} G); a warm start = its "
        "OneShotWarmStart metadata['grad_evals']",
        "journal": os.path.abspath(os.path.join(args.out, "study.journal")),
        "horizon_grad_evals": horizon, "rows": rows, "verdict": line,
        "seconds": time.perf_counter() - start}
    write_json(os.path.join(args.out, "results.json"), result, indent=1,
               allow_nan=False)
    print(saved_line(args.out, ["results.json", "curves.png",
                                "study.journal"]))
    if line:
        print(line)
    return result


if __name__ == "__main__":
    main()
