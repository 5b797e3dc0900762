r"""One-shot hypergradient warm starts (OHGW) under ASHA and PASHA.

The OHGW protocol (DESIGN.md §4) at a size this machine can run: a
multi-fidelity scheduler samples configurations :math:`\psi` (log learning
rate, log weight decay, momentum, label smoothing; plus augmentation
magnitude with ``--full``); each variant trains either :math:`\psi` itself
(``baseline``) or the warm-started :math:`\psi'` that
:class:`gradhpo.integrations.optuna.OptunaWarmStart` returns, with the
scheduler unmodified:

- ``baseline``: no warm start;
- ``ohgw1``: one hyper-step :math:`\psi' = \Pi(\psi - \eta_h \nabla_\psi J)`;
- ``ohgw3``: three hyper-steps (the paper's control);
- ``random``: one step of the same length in a random direction (control);
- with ``--eta-sweep``: ``ohgw1`` at :math:`\eta_h \in \{10^{-4},
  3\cdot10^{-4}, 10^{-3}, 3\cdot10^{-3}\}`.

:math:`J(\psi)` is the plain validation cross-entropy on a held-out batch
:math:`V` (128 validation examples) after ``--lookahead`` SGD steps from the
common initial weights :math:`w_0` on the first training batches (ALGORITHMS.md
§5.2: the literal "one mini-batch, training loss" rule has a zero gradient
for the learning rate and momentum). The default lookahead is 2, because the
momentum's derivative is exactly zero after one step from a zero buffer;
``--lookahead 1`` is the paper's single mini-batch.

**Pairing.** Seed :math:`s` fixes the sampler (Optuna's ``RandomSampler``,
the usual companion of ASHA; ``--sampler tpe`` for TPE), the initial weights,
the data order, :math:`B_{1..K}` and :math:`V`; every variant runs with the
same seed, so with the random sampler all variants see the same sampled
configurations and differ only by the warm start.

**Scheduler.** One report per epoch (digits, MNIST) or per
``--steps-per-report`` steps (``--full``) of validation accuracy (maximised),
``--max-reports`` reports at most. ASHA is Optuna's
``SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)``, PASHA is
:class:`gradhpo.integrations.pasha.PASHAPruner` with the same rungs and
``max_resource = --max-reports`` (a trial stopped at PASHA's current maximum
returns its value and becomes COMPLETE).

**Metrics** (per variant and seed, then paired across seeds):

- T@τ: wall time and gradient evaluations from the start of the study until
  the best validation accuracy reported by any trial first reaches the
  target τ (``--target``). A run that never reaches it is *censored* at its
  total; the JSON says how many reached it.
- Best final metric: the test accuracy of the selected trial (ASHA: the best
  COMPLETE trial by final validation accuracy; PASHA:
  :func:`~gradhpo.integrations.pasha.pasha_best_trial`), not retrained.
- AUC: the area under best-validation-accuracy versus time (and versus
  gradient evaluations), divided by the horizon; the horizon of a seed is
  the shortest total over the variants, so all variants are compared on the
  same interval.
- Warm-start overhead share: warm-start time and gradient evaluations over
  the study's totals.
- Seed variance: the standard deviation over seeds of each metric.
- KL divergence between the final :math:`\psi` distributions of a variant
  and the baseline: the configurations *trained* (:math:`\psi'` for warm
  starts) by the trials selected at the highest fidelity reached, pooled
  over seeds, each coordinate mapped to [0, 1] over its search range (log
  range for log parameters); a Gaussian KDE (Scott's bandwidth) per
  coordinate, KL integrated on a grid of 512 points over [-0.25, 1.25], and
  the coordinates' KLs summed (the KL of the product of the marginals).
  Null, with the reason, when a coordinate has fewer than two distinct
  values.
- Paired two-sided Wilcoxon signed-rank tests (``scipy.stats.wilcoxon``)
  of each variant against the baseline over seeds. Null, with the reason,
  when there are fewer than two pairs or every paired difference is zero.

**Cost unit.** G = one forward and backward pass of the training loss on
one batch (ALGORITHMS.md §0.3). A training step is 1 G; one warm-start
hyper-step with lookahead :math:`K` is counted as :math:`3K + 1` G
(:math:`K` inner gradients, their reverse-mode pass at about twice their
cost, one validation gradient; §5.4 estimates 2–5 G for :math:`K = 1`).
Evaluation passes are not counted in G (they are in the wall time).

**Several processes, one study.** ``--storage`` takes an Optuna journal file
path (``optuna.storages.JournalStorage`` with ``JournalFileBackend``; no
server needed) or a database URL (``sqlite:///ohgw.db``,
``postgresql://...``). ``--workers N`` then starts N - 1 more processes of
this script on the same storage: each study (one per variant and seed,
named ``{--study-name}-{scheduler}-{variant}-seed{s}``) gets its
``--trials`` trials from all N processes together (process ``i`` runs trial
share ``i``), and process 0 reads the finished studies back and reports. To
spread the work over machines instead, run the script on each with the same
``--storage``, ``--study-name``, ``--workers N`` and its own
``--worker-index i`` (0 waits for nothing: start it last, or rerun it with
``--analyse-only`` when the others are done). Every process uses its own
sampler seed (derived from the seed and its index), so with several
workers the pairing across variants is only approximate, and wall times of
processes on different machines are compared through their clocks.

Data: scikit-learn's digits (an MLP) by default; ``--data-dir`` reads MNIST
IDX files (an MLP; when only the test files exist they are split and the
output says so); ``--full`` runs ResNet-20 on CIFAR-10 (``--data-dir`` with
the python batches; the model and augmentation of ``examples/cifar10.py``),
which needs a GPU to finish in hours rather than weeks.

**Language** (``--task language``): the same protocol on a decoder-only
transformer LM (``examples/lm.py``: learned positions, pre-LayerNorm,
causal self-attention, tied embeddings; 2 layers, width 64, 4 heads,
context 64 by default, GPT-2-small's 12 / 768 / 12 / 1024 with ``--full``)
over byte tokens (vocabulary 256, ``text_utils.py``), trained with AdamW.
:math:`\psi` = log learning rate, log (decoupled) weight decay, label
smoothing and the embedding-noise level (Gaussian noise on the input
embeddings from a key carried in the batch: differentiable and
deterministic, used instead of dropout). Data: ``--data-dir`` with the
WikiText-103 raw files, ``--text FILE`` (a plain text split contiguously
90/5/5; runs here use ``../shared/data/tinyshakespeare/input.txt``), or by
default the embedded corpus (English docstrings of standard-library
modules; the output names it). Differences from the vision setting:

- the scheduler defaults to PASHA (``--scheduler asha`` for ASHA); the
  reports are the validation perplexity (minimised) on the first
  ``--eval-tokens`` validation tokens, every ``--steps-per-report`` AdamW
  steps on seeded random windows;
- T@τ uses the target perplexity ``--target-ppl`` (default
  ``DEFAULT_TARGET_PPL`` = 20 on the embedded corpus, which the default
  small model reaches after about a hundred steps of a good configuration
  and PASHA's best trial ends near 18; on Tiny Shakespeare the small model
  ends near 14-15 and ``--target-ppl 16`` is the comparable choice; the
  best-so-far curve starts at 256, the uniform model);
- the final metrics are the selected trial's test perplexity and its
  out-of-domain perplexity (the embedded docstrings when training on a file
  or WikiText; Tiny Shakespeare, or Python source code if it is absent,
  when training on the docstrings; the first ``--ood-tokens`` tokens);
  every perplexity is :math:`\exp` of the mean token NLL over all
  predicted tokens (each token of a split predicted once);
- ``--token-noise f`` replaces exactly ``round(f N)`` training tokens by a
  different random byte, seeded by ``--seed`` (the same corruption for all
  variants and paired seeds); ``--label-noise f`` does the same to the
  training labels of the vision task;
- ``--quick`` uses a one-layer width-32 model and a one-step lookahead
  (three warm-start compilations dominate a quick run).

Examples::

    python examples/ohgw.py --quick                  # tests: under 90 s
    python examples/ohgw.py --task language --text \
        ../shared/data/tinyshakespeare/input.txt --seeds 4
    python examples/ohgw.py --task language --token-noise 0.15
    python examples/ohgw.py --seeds 5                # digits, ASHA
    python examples/ohgw.py --scheduler pasha --eta-sweep
    python examples/ohgw.py --data-dir ../shared/data/mnist --target 0.9
    python examples/ohgw.py --storage runs/ohgw.journal --workers 2
    python examples/ohgw.py --full --data-dir ~/data/cifar10 --trials 64
"""

import argparse
import math
import os
import subprocess
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cli import (add_common_flags, fill_defaults, float_in,  # noqa: E402
                 method_colours, name_list, nonnegative_int, positive_float,
                 positive_int, progress, pyplot, saved_line, verdict,
                 write_json)

#: --task language: default target validation perplexity (byte level) of
#: the small CPU model, and of the GPT-2-small-sized model with --full.
DEFAULT_TARGET_PPL = 20.0
FULL_TARGET_PPL = 3.0
ETAS = (1e-4, 3e-4, 1e-3, 3e-3)
#: The sizes of ``lm.SMALL`` (the default language model), as flags; kept
#: here so that parsing flags does not import Flax (a test checks them).
LM_DEFAULTS = dict(layers=2, d_model=64, heads=4, context=64)


def variants(args):
    """``{name: (num_steps, direction, eta)}``; None for the baseline."""
    out = {"baseline": None, "ohgw1": (1, "hypergradient", args.eta),
           "ohgw3": (3, "hypergradient", args.eta),
           "random": (1, "random", args.eta)}
    if args.eta_sweep:
        for eta in ETAS:
            if eta != args.eta:
                out[f"ohgw1_eta{eta:.0e}"] = (1, "hypergradient", eta)
    if args.variants:
        keep = args.variants.split(",")
        unknown = sorted(set(keep) - set(out))
        if unknown:
            raise SystemExit(f"--variants: unknown {unknown}; choose from "
                             f"{sorted(out)}")
        out = {k: v for k, v in out.items() if k in keep}
    return out


#: --label-noise / --token-noise: a share of the training data, [0, 1).
noise_share = float_in(0.0, 1.0, high_open=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring (python -c 'import ohgw; "
               "help(ohgw)') for the metrics and the cost unit.")
    p.add_argument("--task", choices=("vision", "language"),
                   default="vision",
                   help="vision: an MLP / ResNet-20 classifier; language: "
                   "a decoder-only transformer LM (examples/lm.py)")
    p.add_argument("--scheduler", choices=("asha", "pasha"),
                   help="default: asha (vision), pasha (language)")
    p.add_argument("--sampler", choices=("random", "tpe"), default="random")
    p.add_argument("--trials", type=positive_int,
                   help="trials per study (one study per variant and seed; "
                   "default 64 vision, 12 language)")
    p.add_argument("--max-reports", type=positive_int,
                   help="reports (epochs) of a trial that is never pruned "
                   "(default 27 vision, 9 language)")
    p.add_argument("--target", type=float_in(0.0, 1.0, low_open=True),
                   help="vision: target validation accuracy tau, in (0, 1] "
                   "(default: 0.975 digits, 0.95 MNIST, 0.93 CIFAR-10)")
    p.add_argument("--target-ppl", type=float_in(1.0),
                   help="language: target validation perplexity tau "
                   f"(default {DEFAULT_TARGET_PPL}; --full "
                   f"{FULL_TARGET_PPL})")
    p.add_argument("--eta", type=positive_float, default=1e-3,
                   help="hyper step size eta_h (paper: 1e-3)")
    p.add_argument("--eta-sweep", action="store_true",
                   help="add ohgw1 at eta_h in {1e-4, 3e-4, 1e-3, 3e-3}")
    p.add_argument("--lookahead", type=positive_int,
                   help="inner steps K of the warm-start lookahead (default "
                   "2; 1 with --task language --quick)")
    p.add_argument("--variants",
                   help="comma-separated subset of the variants to run")
    p.add_argument("--data-dir",
                   help="MNIST IDX files (or, with --full, CIFAR-10; with "
                   "--task language, the WikiText-103 raw files)")
    p.add_argument("--text",
                   help="language: a plain-text corpus (split 90/5/5)")
    p.add_argument("--full", action="store_true",
                   help="ResNet-20 on CIFAR-10, with augmentation magnitude "
                   "(language: the GPT-2-small-sized model)")
    p.add_argument("--label-noise", type=noise_share, default=0.0,
                   help="vision: replace this share of training labels by "
                   "a different random class (seeded by --seed), in [0, 1)")
    p.add_argument("--token-noise", type=noise_share, default=0.0,
                   help="language: replace this share of training tokens "
                   "by a different random byte (seeded by --seed), in "
                   "[0, 1)")
    p.add_argument("--batch-size", type=positive_int,
                   help="default 128 (vision), 32 windows (language)")
    p.add_argument("--layers", type=positive_int,
                   help="language: transformer blocks (default "
                   f"{LM_DEFAULTS['layers']})")
    p.add_argument("--d-model", type=positive_int,
                   help="language: model width (default "
                   f"{LM_DEFAULTS['d_model']})")
    p.add_argument("--heads", type=positive_int,
                   help="language: attention heads (default "
                   f"{LM_DEFAULTS['heads']})")
    p.add_argument("--context", type=positive_int,
                   help="language: tokens per window (default "
                   f"{LM_DEFAULTS['context']})")
    p.add_argument("--eval-tokens", type=nonnegative_int,
                   help="language: validation tokens per report (0: all; "
                   "default 16384)")
    p.add_argument("--ood-tokens", type=nonnegative_int,
                   help="language: out-of-domain tokens (0: all; default "
                   "65536)")
    p.add_argument("--hidden", type=positive_int, default=64,
                   help="MLP hidden width")
    p.add_argument("--max-train", type=nonnegative_int,
                   help="at most this many training examples (0: all; "
                   "default 0)")
    p.add_argument("--width", type=positive_int,
                   help="--full: ResNet channels of stage 1 (default 16)")
    p.add_argument("--blocks", type=positive_int,
                   help="--full: blocks per stage (default and ResNet-20: 3)")
    p.add_argument("--steps-per-report", type=positive_int,
                   help="--full: SGD steps between reports (default 352, "
                   "~1 epoch); language: AdamW steps (default 25)")
    p.add_argument("--eval-size", type=nonnegative_int, default=0,
                   help="--full: validation images per report (0: all)")
    p.add_argument("--seeds", type=positive_int,
                   help="paired seeds: seed, seed+1, ... (default 8 vision, "
                   "6 language)")
    p.add_argument("--storage",
                   help="Optuna journal file path or database URL")
    p.add_argument("--study-name", default="ohgw")
    p.add_argument("--workers", type=positive_int, default=1,
                   help="processes sharing each study (needs --storage)")
    p.add_argument("--worker-index", type=nonnegative_int, default=0,
                   help=argparse.SUPPRESS)
    p.add_argument("--analyse-only", action="store_true",
                   help="only read the studies in --storage and report")
    add_common_flags(
        p, out="runs/ohgw", seed_help="first seed (also the data split)",
        quick="a small run for tests (well under two minutes). "
        "Changes only the defaults of flags you do not give: "
        "--seeds 2, --trials 9, --max-reports 9; with --task "
        "language --trials 6, --max-reports 4, --batch-size 8, "
        "--steps-per-report 5, --eval-tokens 2048, --ood-tokens "
        "2048, --layers 1, --d-model 32, --heads 2, --context 32, "
        "--lookahead 1 (and --full is ignored); with --full "
        "(vision) --trials 3, --max-reports 3, --width 4, "
        "--blocks 1, --batch-size 16, --steps-per-report 2, "
        "--max-train 256. A flag given explicitly always wins.")
    args = p.parse_args(argv)
    language = args.task == "language"
    normal = dict(scheduler=("asha", "pasha")[language],
                  trials=(64, 12)[language], max_reports=(27, 9)[language],
                  seeds=(8, 6)[language], batch_size=(128, 32)[language],
                  steps_per_report=(352, 200 if args.full else 25)[language],
                  lookahead=2, eval_tokens=16384, ood_tokens=65536,
                  width=16, blocks=3, max_train=0, **LM_DEFAULTS)
    quick = {}
    if args.quick:
        quick = dict(seeds=2, trials=9, max_reports=9)
        if language:
            # a one-step lookahead compiles ~3x faster
            quick.update(trials=6, max_reports=4, batch_size=8,
                         steps_per_report=5, eval_tokens=2048,
                         ood_tokens=2048, layers=1, d_model=32, heads=2,
                         context=32, lookahead=1)
            args.full = False
        elif args.full:
            quick.update(width=4, blocks=1, batch_size=16,
                         steps_per_report=2, max_train=256, max_reports=3,
                         trials=3)
    fill_defaults(args, normal, quick)
    check_task_options(p, args)
    if language:
        args.metric, args.direction = "perplexity", "minimize"
        args.floor = 256.0      # before any report: the uniform model
        args.target = args.target_ppl or (FULL_TARGET_PPL if args.full
                                          else DEFAULT_TARGET_PPL)
    else:
        args.metric, args.direction, args.floor = "accuracy", "maximize", 0.0
    if args.target is None:
        args.target = (0.93 if args.full else 0.95 if args.data_dir
                       else 0.975)
    if args.workers > 1 and not args.storage:
        p.error("--workers > 1 needs --storage (a journal file or a URL)")
    if not 0 <= args.worker_index < args.workers:
        p.error("--worker-index must be in [0, --workers)")
    if args.seed + args.seeds - 1 > 2 ** 32 - 1:
        p.error(f"--seed {args.seed} with --seeds {args.seeds} goes past "
                "the largest seed, 2**32 - 1")
    if language and not args.full and args.d_model % args.heads:
        p.error(f"--d-model ({args.d_model}) must be divisible by --heads "
                f"({args.heads})")
    if args.variants is not None:
        known = variants(argparse.Namespace(**{**vars(args),
                                               "variants": None}))
        try:
            args.variants = name_list(known, "variant")(args.variants)
        except argparse.ArgumentTypeError as e:
            p.error(f"argument --variants: {e}")
    args.seed_list = list(range(args.seed, args.seed + args.seeds))
    return args


def check_task_options(p, args):
    language = args.task == "language"
    if args.label_noise and language:
        p.error("--label-noise is for --task vision; use --token-noise")
    if args.token_noise and not language:
        p.error("--token-noise is for --task language; use --label-noise")
    if args.text and not language:
        p.error("--text is for --task language")
    if args.text and args.data_dir:
        p.error("give --text or --data-dir (WikiText-103), not both")
    if args.target_ppl is not None and not language:
        p.error("--target-ppl is for --task language; use --target")
    if args.target is not None and language:
        p.error("--target (an accuracy) is for --task vision; use "
                "--target-ppl")


if __name__ == "__main__":
    parse_args()    # --help and usage errors before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import optuna  # noqa: E402
from jax import lax  # noqa: E402
from tqdm import tqdm  # noqa: E402

import gradhpo as gh  # noqa: E402
from gradhpo.integrations.optuna import OptunaWarmStart  # noqa: E402
from gradhpo.integrations.pasha import (  # noqa: E402
    PASHADecision, PASHAPruner, pasha_best_trial)
from gradhpo.utils import gradients as gr  # noqa: E402

import data_utils  # noqa: E402  (the examples' data loaders)
import lm  # noqa: E402  (the sibling example: the transformer LM)
import text_utils  # noqa: E402  (the examples' text corpora)

lm_defaults = lm.SMALL
KL_GRID = np.linspace(-0.25, 1.25, 512)


# -- the search space ---------------------------------------------------------

def suggest(trial, full, language=False):
    """Samples :math:`\\psi`; log parameters are stepped in log space."""
    if language:
        return {name: trial.suggest_float(name, lo, hi, log=log)
                for name, (lo, hi, log) in LM_SPACE.items()}
    values = {
        "lr": trial.suggest_float("lr", 1e-3, 1.0, log=True),
        "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-1,
                                            log=True),
        "momentum": trial.suggest_float("momentum", 0.0, 0.95),
        "label_smoothing": trial.suggest_float("label_smoothing", 0.0, 0.3),
    }
    if full:
        values["aug_magnitude"] = trial.suggest_float("aug_magnitude",
                                                      0.0, 1.0)
    return values


LOG_NAMES = ("lr", "weight_decay")
#: --task language: ``{name: (low, high, log)}`` (AdamW, see examples/lm.py).
LM_SPACE = {"lr": (1e-4, 3e-2, True), "weight_decay": (1e-3, 1.0, True),
            "label_smoothing": (0.0, 0.3, False),
            "embed_noise": (0.0, 0.5, False)}


def coordinates(values):
    """``{name: coordinate}`` as the losses read it (log for lr and wd)."""
    return {k: jnp.asarray(math.log(v) if k in LOG_NAMES else v, jnp.float32)
            for k, v in values.items()}


def smoothed_ce(logits, labels, smoothing):
    targets = optax.smooth_labels(
        jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def inner_optimizer(mask=None):
    def make(hp):
        return optax.chain(
            optax.add_decayed_weights(jnp.exp(hp["weight_decay"]), mask),
            optax.sgd(jnp.exp(hp["lr"]), momentum=hp["momentum"]))
    return make


# -- tasks: the default MLP and the --full ResNet-20 --------------------------

def mlp_task(args):
    """An MLP on digits (or MNIST); one report per epoch. The functions are
    built once (compiled once for all seeds and variants); ``for_seed``
    gives a seed's initial weights, data order and warm-start batches."""
    if args.data_dir:
        splits = data_utils.load_mnist_splits(args.data_dir, seed=args.seed)
    else:
        splits = data_utils.load_digits_splits(seed=args.seed)
    (xtr, ytr), (xva, yva), (xte, yte) = splits.train, splits.val, splits.test
    flat = [x.reshape(len(x), -1).astype(np.float32) for x in (xtr, xva, xte)]
    xtr, xva, xte = data_utils.standardize(*flat)
    if args.max_train:
        xtr, ytr = xtr[:args.max_train], ytr[:args.max_train]
    ytr, noise_note = noisy_labels(ytr, args)
    train = (jnp.asarray(xtr), jnp.asarray(ytr, jnp.int32))
    val = (jnp.asarray(xva), jnp.asarray(yva, jnp.int32))
    test = (jnp.asarray(xte), jnp.asarray(yte, jnp.int32))
    sizes = (xtr.shape[1], args.hidden, args.hidden, 10)

    def logits(params, x):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    def train_loss(params, hp, batch):
        return smoothed_ce(logits(params, batch[0]), batch[1],
                           hp["label_smoothing"])

    def val_loss(params, hp, batch):
        del hp
        return optax.softmax_cross_entropy_with_integer_labels(
            logits(params, batch[0]), batch[1]).mean()

    inner = inner_optimizer()
    per_epoch = len(ytr) // args.batch_size
    if per_epoch < args.lookahead:
        raise SystemExit(
            f"ohgw.py: error: --batch-size {args.batch_size} makes "
            f"{per_epoch} batches of the {len(ytr)} training examples; the "
            f"warm start needs --lookahead ({args.lookahead}): lower "
            "--batch-size (or raise --max-train)")

    @jax.jit
    def train_epoch(params, opt_state, hp, idx, x, y):
        def body(carry, i):
            out = gr.guard_inner_step(
                gr.inner_step(train_loss, inner, carry[0], carry[1], hp,
                              (x[i], y[i])), *carry)
            return (out.params, out.opt_state), out.loss
        return lax.scan(body, (params, opt_state), idx)[0]

    @jax.jit
    def accuracy(params, x, y):
        return jnp.mean(jnp.argmax(logits(params, x), -1) == y)

    def for_seed(seed):
        keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
        params0 = [{"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m),
                    "b": jnp.zeros(n)}
                   for k, m, n in zip(keys, sizes, sizes[1:])]
        rng = np.random.default_rng([seed, 0])
        order = jnp.asarray(np.stack([
            rng.permutation(len(ytr))[:per_epoch * args.batch_size]
            .reshape(per_epoch, args.batch_size)
            for _ in range(args.max_reports)]))
        first = order[0, :args.lookahead]
        ws_train = (train[0][first], train[1][first])
        if args.lookahead == 1:
            ws_train = jax.tree.map(lambda x: x[0], ws_train)
        v = np.random.default_rng([seed, 1]).choice(
            len(yva), min(args.batch_size, len(yva)), replace=False)
        return types.SimpleNamespace(
            params0=params0, ws_train=ws_train, ws_val=(val[0][v], val[1][v]),
            train_chunk=lambda p, s, hp, r: train_epoch(p, s, hp, order[r],
                                                        *train))

    note = "\n".join(n for n in (splits.note, noise_note) if n)
    return types.SimpleNamespace(
        name=splits.source, note=note or None, train_loss=train_loss,
        val_loss=val_loss, inner=inner, steps_per_report=per_epoch,
        val_metric=lambda p: float(accuracy(p, *val)),
        test_metrics=lambda p: {"test_accuracy": float(accuracy(p, *test))},
        for_seed=for_seed)


def noisy_labels(labels, args):
    """``--label-noise``: exactly ``round(f N)`` training labels replaced by
    a different random class (:func:`text_utils.corrupt_tokens` with the
    classes as the vocabulary), seeded by ``--seed``, so every variant and
    paired seed trains on the same corrupted labels. Returns ``(labels,
    note)``."""
    if not args.label_noise:
        return labels, ""
    labels = np.asarray(labels)
    noisy, mask = text_utils.corrupt_tokens(
        labels, args.label_noise, args.seed, vocab_size=int(labels.max()) + 1)
    return noisy.astype(labels.dtype), (
        f"label noise: {int(mask.sum())} of {len(labels)} training labels "
        f"({args.label_noise:.0%}) replaced by a different random class "
        f"(seed {args.seed}); validation and test labels are clean.")


def load_text(args):
    """The corpus of --task language and whether it is the embedded one."""
    if args.data_dir:
        return text_utils.load_wikitext103(args.data_dir), False
    if args.text:
        return text_utils.load_text_file(args.text), False
    return text_utils.load_embedded(), True


def lm_task(args):
    """A decoder-only transformer LM (examples/lm.py) on byte tokens; one
    report (validation perplexity, minimised) per ``--steps-per-report``
    AdamW steps."""
    splits, embedded = load_text(args)
    config = lm.GPT2_SMALL if args.full else lm.LMConfig(
        context=args.context, depth=args.layers, width=args.d_model,
        heads=args.heads)
    ctx, steps = config.context, args.steps_per_report
    notes = []
    train_tokens = splits.train
    if args.token_noise:
        train_tokens, mask = text_utils.corrupt_tokens(
            train_tokens, args.token_noise, seed=args.seed)
        notes.append(
            f"token noise: {int(mask.sum()):,} of {len(mask):,} training "
            f"tokens ({args.token_noise:.0%}) replaced by a different random "
            f"byte (seed {args.seed}); validation, test and OOD text clean.")
    ood, ood_source = text_utils.out_of_domain(embedded,
                                               args.ood_tokens or None)
    notes.append(f"OOD text: {ood_source}.")
    evals = 8 if args.full else 4096 // ctx     # windows per eval batch
    val_tokens = splits.val[:args.eval_tokens or None]
    val_w, test_w, ood_w = (
        tuple(map(jnp.asarray, text_utils.eval_windows(t, ctx, evals)))
        for t in (val_tokens, splits.test, ood))
    train_loss, val_loss, _ = lm.make_losses(config)
    inner = lm.inner_optimizer()
    nll_sum = lm.make_nll_sum(config)

    @jax.jit
    def train_chunk(params, opt_state, hp, windows, key, step0):
        def body(carry, i):
            batch = {"tokens": windows[i],
                     "key": jax.random.fold_in(key, step0 + i)}
            out = gr.guard_inner_step(
                gr.inner_step(train_loss, inner, carry[0], carry[1], hp,
                              batch), *carry)
            return (out.params, out.opt_state), out.loss
        return lax.scan(body, (params, opt_state),
                        jnp.arange(windows.shape[0]))[0]

    def ppl(params, windows):
        return lm.corpus_perplexity(nll_sum, params, *windows)

    def for_seed(seed):
        params0 = lm.init_params(config, seed)
        starts = text_utils.window_starts(
            len(train_tokens), ctx, args.batch_size,
            args.max_reports * steps, sub_seed(seed, 0))
        key = jax.random.PRNGKey(sub_seed(seed, 2))   # embedding noise
        first = text_utils.take_windows(train_tokens,
                                        starts[:args.lookahead], ctx)
        ws_train = {"tokens": jnp.asarray(first), "key": jax.vmap(
            lambda i: jax.random.fold_in(key, i))(
                jnp.arange(args.lookahead))}
        if args.lookahead == 1:
            ws_train = jax.tree.map(lambda x: x[0], ws_train)
        v = text_utils.window_starts(len(splits.val), ctx, args.batch_size,
                                     1, sub_seed(seed, 1))[0]
        ws_val = {"tokens": jnp.asarray(
            text_utils.take_windows(splits.val, v, ctx))}

        def chunk(params, opt_state, hp, r):
            windows = text_utils.take_windows(
                train_tokens, starts[r * steps:(r + 1) * steps], ctx)
            return train_chunk(params, opt_state, hp, jnp.asarray(windows),
                               key, jnp.int32(r * steps))
        return types.SimpleNamespace(params0=params0, ws_train=ws_train,
                                     ws_val=ws_val, train_chunk=chunk)

    size = (f"{config.depth} layers, width {config.width}, {config.heads} "
            f"heads, context {ctx}, "
            f"{lm.parameter_count(lm.init_params(config, 0)):,} parameters")
    return types.SimpleNamespace(
        name=f"{splits.source}\ndecoder-only transformer: {size}; byte "
        f"tokens (vocabulary {text_utils.VOCAB_SIZE}); validation "
        f"perplexity on {len(val_tokens):,} tokens per report",
        note="\n".join(notes), train_loss=train_loss, val_loss=val_loss,
        inner=inner, steps_per_report=steps,
        val_metric=lambda p: ppl(p, val_w),
        test_metrics=lambda p: {"test_perplexity": ppl(p, test_w),
                                "ood_perplexity": ppl(p, ood_w)},
        for_seed=for_seed)


def sub_seed(seed, stream):
    """An int seed for stream ``stream`` of paired seed ``seed``."""
    return int(np.random.SeedSequence([seed, stream]).generate_state(1)[0])


def resnet_task(args):
    """ResNet-20 on CIFAR-10 with the augmentation of examples/cifar10.py."""
    sys.path.insert(0, HERE)
    import cifar10   # the sibling example: model, data, augmentation

    data_dir = args.data_dir
    if data_dir is None:
        if not args.quick:
            raise SystemExit(cifar10.NO_DATA)
        data_dir = cifar10.write_fake_cifar10(
            os.path.join(args.out, "fake_cifar10"))
    train, val, test = cifar10.load(data_dir, args.seed, args.max_train)
    labels, noise_note = noisy_labels(train[1], args)
    train = (train[0], labels.astype(np.int32))
    model = cifar10.ResNet(width=args.width, blocks=args.blocks)

    def train_loss(params, hp, batch):
        m = hp["aug_magnitude"]
        x = cifar10.augment(batch["x"], m * cifar10.MAX_SHIFT,
                            m * cifar10.MAX_NOISE, batch["shift"],
                            batch["pixel"])
        return smoothed_ce(model.apply({"params": params}, x), batch["y"],
                           hp["label_smoothing"])

    def val_loss(params, hp, batch):
        del hp
        return optax.softmax_cross_entropy_with_integer_labels(
            model.apply({"params": params}, batch["x"]), batch["y"]).mean()

    inner = inner_optimizer(cifar10.decay_mask)

    @jax.jit
    def train_step(params, opt_state, hp, batch):
        out = gr.guard_inner_step(gr.inner_step(
            train_loss, inner, params, opt_state, hp, batch),
            params, opt_state)
        return out.params, out.opt_state

    evaluate = cifar10.make_evaluate(model, 500)

    def for_seed(seed):
        params0 = model.init(jax.random.PRNGKey(seed),
                             jnp.zeros((1, 32, 32, 3)))["params"]
        batch_args = types.SimpleNamespace(seed=seed,
                                           batch_size=args.batch_size)

        def train_chunk(params, opt_state, hp, r):
            for i in range(args.steps_per_report):
                batch = cifar10.train_batch(train, batch_args,
                                            r * args.steps_per_report + i)
                params, opt_state = train_step(params, opt_state, hp, batch)
            return params, opt_state

        ws = [cifar10.train_batch(train, batch_args, i)
              for i in range(args.lookahead)]
        ws_train = ws[0] if args.lookahead == 1 else jax.tree.map(
            lambda *x: np.stack(x), *ws)
        return types.SimpleNamespace(
            params0=params0, ws_train=ws_train, train_chunk=train_chunk,
            ws_val=cifar10.val_batch(val, batch_args, 0))

    return types.SimpleNamespace(
        name=f"CIFAR-10 from {data_dir}", note=noise_note or None,
        train_loss=train_loss, val_loss=val_loss, inner=inner,
        steps_per_report=args.steps_per_report,
        val_metric=lambda p: float(evaluate(p, val, args.eval_size)[1]),
        test_metrics=lambda p: {"test_accuracy":
                                float(evaluate(p, test)[1])},
        for_seed=for_seed)


# -- variants -----------------------------------------------------------------

def make_helpers(task, args):
    helpers = {}
    for name, spec in variants(args).items():
        if spec is None:
            helpers[name] = None
            continue
        num_steps, direction, eta = spec
        helpers[name] = OptunaWarmStart(gh.OneShotWarmStart(
            task.train_loss, task.val_loss, task.inner, step_size=eta,
            num_steps=num_steps, lookahead=args.lookahead,
            direction=direction), key=jax.random.PRNGKey(args.seed))
    return helpers


def warm_start_cost(helper):
    ws = helper.warm_start
    return ws.num_steps * (3 * ws.lookahead + 1)


# -- one study ----------------------------------------------------------------

def make_pruner(args):
    if args.scheduler == "pasha":
        return PASHAPruner(min_resource=1, reduction_factor=3,
                           max_resource=args.max_reports)
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1,
                                                  reduction_factor=3)


def make_objective(task, run, helper, args, pruner, t0):
    def objective(trial):
        sampled = suggest(trial, args.full, args.task == "language")
        events = []
        if helper is None:
            values = sampled
        else:
            values = helper.apply(trial, run.params0, run.ws_train,
                                  run.ws_val)
            events.append([time.time() - t0, warm_start_cost(helper), None])
        hp = coordinates(values)
        params = run.params0
        opt_state = gr.init_inner_state(task.inner, params, hp)
        trial.set_user_attr("worker", os.getpid())
        for r in range(args.max_reports):
            params, opt_state = run.train_chunk(params, opt_state, hp, r)
            value = task.val_metric(params)
            events.append([time.time() - t0, task.steps_per_report, value])
            trial.report(value, r)
            if r + 1 < args.max_reports and trial.should_prune():
                trial.set_user_attr("events", events)
                if (isinstance(pruner, PASHAPruner) and
                        pruner.last_decision(trial.number)
                        is PASHADecision.STOP_AT_MAX):
                    record_test(trial, task, params)
                    return value
                raise optuna.TrialPruned()
        trial.set_user_attr("events", events)
        record_test(trial, task, params)
        return value
    return objective


def record_test(trial, task, params):
    """The final test metrics (``test_accuracy``, or ``test_perplexity`` and
    ``ood_perplexity``) of a trial that reached its last report."""
    for key, value in task.test_metrics(params).items():
        trial.set_user_attr(key, value)


def open_storage(spec):
    if spec is None:
        return None
    if "://" in spec:
        return spec
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    return JournalStorage(JournalFileBackend(spec))


def worker_seed(seed, index):
    if index == 0:
        return seed
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def study_name(args, variant, seed):
    return f"{args.study_name}-{args.scheduler}-{variant}-seed{seed}"


def run_study(task, run, helper, args, variant, seed, storage, bar):
    sampler = (optuna.samplers.TPESampler if args.sampler == "tpe" else
               optuna.samplers.RandomSampler)(
        seed=worker_seed(seed, args.worker_index))
    pruner = make_pruner(args)
    study = optuna.create_study(
        storage=storage, study_name=study_name(args, variant, seed),
        direction=args.direction, sampler=sampler, pruner=pruner,
        load_if_exists=storage is not None)
    if "t0" not in study.user_attrs:
        study.set_user_attr("t0", time.time())
    t0 = study.user_attrs["t0"]
    share = (args.trials // args.workers
             + (args.worker_index < args.trials % args.workers))
    study.optimize(make_objective(task, run, helper, args, pruner, t0),
                   n_trials=share, callbacks=[lambda s, t: bar.update()])
    return study


def warm_up(task, run, helpers, args):
    """Compiles everything once, before any clock starts."""
    fixed = optuna.create_study().ask()
    sampled = suggest(fixed, args.full, args.task == "language")
    hp = coordinates(sampled)
    state = gr.init_inner_state(task.inner, run.params0, hp)
    jax.block_until_ready(run.train_chunk(run.params0, state, hp, 0))
    task.val_metric(run.params0)
    task.test_metrics(run.params0)
    for helper in helpers.values():
        if helper is not None:
            dummy = optuna.trial.create_trial(
                params=sampled, distributions=fixed.distributions, value=0.0)
            helper.apply(dummy, run.params0, run.ws_train, run.ws_val)


# -- analysis -----------------------------------------------------------------

def final_trials(study, pruner, args):
    """The trials at the highest fidelity and the selected one."""
    done = [t for t in study.trials if t.number < args.trials and t.state in
            (optuna.trial.TrialState.COMPLETE,
             optuna.trial.TrialState.PRUNED)]
    if not done:
        return [], None
    top = max(t.last_step if t.last_step is not None else -1 for t in done)
    test_key = f"test_{args.metric}"
    finals = [t for t in done if t.last_step == top
              and test_key in t.user_attrs]
    best = None
    if isinstance(pruner, PASHAPruner):
        try:
            best = pasha_best_trial(study, pruner)
        except ValueError:
            best = None
    if best is None or test_key not in best.user_attrs:
        sign = 1.0 if args.direction == "maximize" else -1.0
        best = max(finals, key=lambda t: (sign * t.value, -t.number),
                   default=None)
    return finals, best


def analyse_run(study, args):
    trials = [t for t in study.trials if t.number < args.trials
              and "events" in t.user_attrs]
    events = sorted((e for t in trials for e in t.user_attrs["events"]),
                    key=lambda e: e[0])
    times = np.array([e[0] for e in events])
    grads = np.cumsum([e[1] for e in events])
    values = np.array([np.nan if e[2] is None else e[2] for e in events])
    if args.direction == "maximize":
        best = np.fmax.accumulate(np.where(np.isnan(values), -np.inf,
                                           values))
        best = np.where(np.isfinite(best), best, args.floor)
        hit = np.nonzero(best >= args.target)[0]
    else:   # perplexity: the uniform model's (256) bounds the best so far
        best = np.minimum(np.fmin.accumulate(
            np.where(np.isnan(values), np.inf, values)), args.floor)
        hit = np.nonzero(best <= args.target)[0]
    reached = bool(hit.size)
    i = hit[0] if reached else len(times) - 1
    finals, chosen = final_trials(study, make_pruner(args), args)
    ws_time = sum(t.user_attrs.get("ohgw_seconds", 0.0) for t in trials)
    ws_grads = sum(e[1] for t in trials for e in t.user_attrs["events"]
                   if e[2] is None)
    m = args.metric
    extra = {}
    if args.task == "language":
        extra["final_ood_perplexity"] = (
            None if chosen is None else chosen.user_attrs["ood_perplexity"])
    return {
        "study": study.study_name, "n_trials": len(study.trials),
        "reached_target": reached,
        "t_at_target_seconds": float(times[i]),
        "t_at_target_grad_evals": float(grads[i]),
        "total_seconds": float(times[-1]),
        "total_grad_evals": float(grads[-1]),
        f"best_val_{m}": float(best[-1]),
        f"final_val_{m}": None if chosen is None else chosen.value,
        f"final_test_{m}": None if chosen is None else
        chosen.user_attrs[f"test_{m}"],
        **extra,
        "overhead_time_share": ws_time / max(float(times[-1]), 1e-12),
        "overhead_grad_share": ws_grads / float(grads[-1]),
        "final_psi": [t.user_attrs.get("ohgw_values", t.params)
                      for t in finals],
        "n_final": len(finals),
        "statuses": sorted({t.user_attrs.get("ohgw_status", "none")
                            for t in trials}),
        "curve": {"seconds": times.tolist(), "grad_evals": grads.tolist(),
                  "best": best.tolist()},
        "workers": len({t.user_attrs.get("worker") for t in trials}),
    }


def area(xs, best, horizon):
    """Area under the step function best(x) on [0, horizon] / horizon."""
    xs, best = np.asarray(xs), np.asarray(best)
    edges = np.clip(np.append(xs, horizon), 0, horizon)
    return float(np.sum(best * np.diff(edges)) / horizon)


def wilcoxon(a, b):
    """Paired two-sided Wilcoxon p-value, or (None, reason)."""
    from scipy.stats import wilcoxon as test
    pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
    if len(pairs) < 2:
        return None, f"too few pairs ({len(pairs)})"
    d = np.array([x - y for x, y in pairs], dtype=float)
    if np.all(d == 0):
        return None, "all paired differences are zero (ties)"
    return float(test(d, alternative="two-sided").pvalue), None


def unit_box(args):
    if args.task == "language":
        return {name: (lo, hi) for name, (lo, hi, _) in LM_SPACE.items()}
    box = {"lr": (1e-3, 1.0), "weight_decay": (1e-6, 1e-1),
           "momentum": (0.0, 0.95), "label_smoothing": (0.0, 0.3)}
    if args.full:
        box["aug_magnitude"] = (0.0, 1.0)
    return box


def kl_divergence(p_samples, q_samples, args):
    """Sum over coordinates of KL(p || q) between Gaussian KDEs of the
    coordinates mapped to [0, 1] (see the module docstring)."""
    from scipy.stats import gaussian_kde
    total = 0.0
    for name, (lo, hi) in unit_box(args).items():
        log = name in LOG_NAMES
        f = (lambda v: (math.log(v) - math.log(lo))
             / (math.log(hi) - math.log(lo))) if log else \
            (lambda v: (v - lo) / (hi - lo))
        p = np.array([f(s[name]) for s in p_samples])
        q = np.array([f(s[name]) for s in q_samples])
        if len(np.unique(p)) < 2 or len(np.unique(q)) < 2:
            return None, (f"{name}: fewer than two distinct final values "
                          f"({len(np.unique(p))} and {len(np.unique(q))})")
        dp, dq = gaussian_kde(p)(KL_GRID), gaussian_kde(q)(KL_GRID)
        dp, dq = dp / dp.sum(), dq / dq.sum()
        dq = np.maximum(dq, 1e-300)
        mask = dp > 0
        total += float(np.sum(dp[mask] * np.log(dp[mask] / dq[mask])))
    return total, None


def summarise(runs, args):
    """Per-variant summaries and paired comparisons with the baseline."""
    names = list(runs)
    seeds = sorted({s for r in runs.values() for s in r})
    for s in seeds:     # common horizons per seed
        h_t = min(runs[n][s]["total_seconds"] for n in names)
        h_g = min(runs[n][s]["total_grad_evals"] for n in names)
        for n in names:
            run, c = runs[n][s], runs[n][s]["curve"]
            run["auc_time"] = area(c["seconds"], c["best"], h_t)
            run["auc_grad_evals"] = area(c["grad_evals"], c["best"], h_g)
    compared = ["t_at_target_seconds", "t_at_target_grad_evals",
                f"final_test_{args.metric}", "auc_time", "auc_grad_evals"]
    if args.task == "language":
        compared.insert(3, "final_ood_perplexity")
    metrics = compared + ["overhead_time_share", "overhead_grad_share"]
    out = {}
    base = runs.get("baseline")
    for n in names:
        per_seed = [runs[n][s] for s in seeds]
        summary = {"reached_target": sum(r["reached_target"]
                                         for r in per_seed),
                   "seeds": len(seeds)}
        for m in metrics:
            vals = [r[m] for r in per_seed if r[m] is not None]
            summary[m] = {"mean": float(np.mean(vals)) if vals else None,
                          "std": float(np.std(vals, ddof=1))
                          if len(vals) > 1 else None}
        comparison = {}
        if base is not None and n != "baseline":
            for m in compared:
                a = [runs[n][s][m] for s in seeds]
                b = [base[s][m] for s in seeds]
                p, reason = wilcoxon(a, b)
                comparison[m] = {"p_value": p, "reason": reason}
            for m in ("t_at_target_seconds", "t_at_target_grad_evals"):
                rel = [1 - runs[n][s][m] / base[s][m] for s in seeds
                       if base[s][m] > 0]
                comparison[m]["mean_reduction"] = float(np.mean(rel))
                comparison[m]["median_reduction"] = float(np.median(rel))
            kl, reason = kl_divergence(
                [p for s in seeds for p in runs[n][s]["final_psi"]],
                [p for s in seeds for p in base[s]["final_psi"]], args)
            comparison["kl_final_psi"] = {"value": kl, "reason": reason}
        out[n] = {"summary": summary, "vs_baseline": comparison}
    return out


# -- output -------------------------------------------------------------------

def fmt(x, spec):
    return "-" if x is None else format(x, spec)


# (title, metric, format, width, show p): "±" cells hold mean±std over seeds
VISION_COLUMNS = (
    ("T@tau [s]", "t_at_target_seconds", ".2f", 16, True),
    ("T@tau [G]", "t_at_target_grad_evals", ".0f", 18, True),
    ("test acc", "final_test_accuracy", ".3f", 15, True),
    ("AUC(t)", "auc_time", ".3f", 8, False),
)
LANGUAGE_COLUMNS = (
    ("T@tau [s]", "t_at_target_seconds", ".1f", 16, True),
    ("T@tau [G]", "t_at_target_grad_evals", ".0f", 16, True),
    ("test ppl", "final_test_perplexity", ".2f", 14, True),
    ("OOD ppl", "final_ood_perplexity", ".1f", 14, True),
)


def print_table(summary, args):
    """The results table: one row per variant, paired p-values vs the
    baseline, then the reductions of the time-to-target metrics."""
    if args.task == "language":
        columns, target = LANGUAGE_COLUMNS, "validation perplexity"
        tau = f"{args.target:.2f}"
    else:
        columns, target = VISION_COLUMNS, "validation accuracy"
        tau = f"{args.target:.3f}"
    print(f"\nT@tau with tau = {tau} {target}; "
          f"{args.scheduler.upper()}, {len(args.seed_list)} paired seeds; "
          "mean ± std over seeds; p: paired two-sided Wilcoxon vs baseline")
    head = f"{'variant':<18}{'reach':>6}"
    for title, _, _, width, with_p in columns:
        head += f"{title:>{width}}" + (f"{'p':>7}" if with_p else "")
    head += f"{'ovh t':>7}{'ovh G':>7}{'KL':>8}"
    print(head)
    print("-" * len(head))
    for n, s in summary.items():
        sm, vs = s["summary"], s["vs_baseline"]
        row = f"{n:<18}{sm['reached_target']:>3}/{sm['seeds']:<2}"
        for _, metric, spec, width, with_p in columns:
            v = sm[metric]
            if with_p:
                text = f"{fmt(v['mean'], spec)}±{fmt(v['std'], spec)}"
                p = vs.get(metric, {}).get("p_value")
                row += f"{text:>{width}}{fmt(p, '.3f'):>7}"
            else:
                row += f"{fmt(v['mean'], spec):>{width}}"
        kl = vs.get("kl_final_psi", {}).get("value")
        row += (f"{fmt(sm['overhead_time_share']['mean'], '.1%'):>7}"
                f"{fmt(sm['overhead_grad_share']['mean'], '.1%'):>7}"
                f"{fmt(kl, '.3f'):>8}")
        print(row)
    for n, s in summary.items():
        for m, c in s["vs_baseline"].items():
            if "mean_reduction" in c:
                print(f"{n}: {m} reduction vs baseline: mean "
                      f"{c['mean_reduction']:+.1%}, median "
                      f"{c['median_reduction']:+.1%}, p = "
                      f"{fmt(c['p_value'], '.3f')}"
                      + (f" ({c['reason']})" if c["reason"] else ""))


def plot(runs, args):
    plt = pyplot()
    names, seeds = list(runs), args.seed_list
    colours = method_colours(names, baselines=("baseline",))
    task = ("a byte-level transformer LM" if args.task == "language"
            else "a ResNet" if args.full else "an MLP")
    title = (f"OHGW under {args.scheduler.upper()}, {task}: best validation "
             f"{args.metric} so far (dotted: target)")
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3),
                             sharey=True, squeeze=False)
    for ax, n in zip(axes[0], names):
        for s in seeds:
            c = runs[n][s]["curve"]
            ax.step(c["seconds"], c["best"], where="post", alpha=0.6,
                    color=colours[n])
        ax.axhline(args.target, color="k", ls=":", lw=1)
        ax.set(title=n, xlabel="wall time [s]")
        ax.set_xlim(left=0)
    axes[0][0].set_ylabel(f"best validation {args.metric}")
    fig.suptitle(title)
    if args.task == "language":
        axes[0][0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out,
                             f"{args.metric}_vs_time_per_variant.png"),
                dpi=110)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((axes[0], "seconds", "wall time [s]"),
                           (axes[1], "grad_evals",
                            "gradient evaluations [G]")):
        horizon = min(runs[n][s]["curve"][key][-1] for n in names
                      for s in seeds)
        grid = np.linspace(0, horizon, 200)
        for n in names:
            ys = [np.interp(grid, runs[n][s]["curve"][key],
                            runs[n][s]["curve"]["best"], left=args.floor)
                  for s in seeds]
            ax.plot(grid, np.mean(ys, 0), color=colours[n], label=n)
        ax.axhline(args.target, color="k", ls=":", lw=1)
        ax.set(xlabel=label, ylabel=f"best validation {args.metric} (mean)")
        ax.set_xlim(left=0)
        if args.task == "language":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{title}, mean over {len(seeds)} seeds")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, f"{args.metric}_vs_time_all.png"),
                dpi=110)
    cols = min(len(seeds), 4)
    rows = -(-len(seeds) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 3 * rows),
                             squeeze=False)
    for ax, s in zip(axes.ravel(), seeds):
        for n in names:
            c = runs[n][s]["curve"]
            ax.step(c["seconds"], c["best"], where="post", label=n,
                    color=colours[n])
        ax.axhline(args.target, color="k", ls=":", lw=1)
        ax.set(title=f"seed {s}", xlabel="wall time [s]")
        ax.set_xlim(left=0)
        if args.task == "language":
            ax.set_yscale("log")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "per_seed.png"), dpi=110)
    plt.close("all")


# -- main ---------------------------------------------------------------------

def spawn_workers(argv, args):
    procs = []
    for i in range(1, args.workers):
        cmd = [sys.executable, os.path.abspath(__file__), *argv,
               "--worker-index", str(i)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL))
    return procs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    storage = open_storage(args.storage)
    names = list(variants(args))
    procs = []
    if args.workers > 1 and args.worker_index == 0 and not args.analyse_only:
        procs = spawn_workers(argv, args)
    studies = {n: {} for n in names}
    if not args.analyse_only:
        share = (args.trials // args.workers
                 + (args.worker_index < args.trials % args.workers))
        bar = progress(total=share * len(names) * args.seeds,
                       desc="trials", disable=args.worker_index > 0)
        task = (lm_task if args.task == "language" else
                resnet_task if args.full else mlp_task)(args)
        if args.worker_index == 0:
            tqdm.write(task.name + (f"\n{task.note}" if task.note else ""))
        helpers = make_helpers(task, args)
        for seed in args.seed_list:
            run = task.for_seed(seed)
            warm_up(task, run, helpers, args)
            for n in names:
                bar.set_postfix(variant=n, seed=seed)
                studies[n][seed] = run_study(task, run, helpers[n], args, n,
                                             seed, storage, bar)
        bar.close()
    for proc in procs:
        if proc.wait() != 0:
            raise SystemExit(f"worker {proc.args} failed ({proc.returncode})")
    if args.worker_index > 0:
        return None
    runs = {n: {} for n in names}
    for n in names:
        for seed in args.seed_list:
            study = optuna.load_study(
                study_name=study_name(args, n, seed),
                storage=storage) if storage else studies[n][seed]
            runs[n][seed] = analyse_run(study, args)
    summary = summarise(runs, args)
    print_table(summary, args)
    result = {"args": {k: v for k, v in vars(args).items()},
              "target": args.target, "cost_unit": "G = one forward+backward "
              "of the training loss on one batch; warm start = num_steps * "
              "(3 K + 1) G",
              "variants": {n: {"summary": summary[n]["summary"],
                               "vs_baseline": summary[n]["vs_baseline"],
                               "runs": {str(s): runs[n][s]
                                        for s in args.seed_list}}
                           for n in names}}
    write_json(os.path.join(args.out, "results.json"), result, indent=1,
               allow_nan=False)
    plot(runs, args)
    print(saved_line(args.out, ["results.json", *plot_files(args)]))
    line = final_verdict(result, args)
    if line:
        print(line)
    return result


def plot_files(args):
    return [f"{args.metric}_vs_time_per_variant.png",
            f"{args.metric}_vs_time_all.png", "per_seed.png"]


def verdict_rows(result, args):
    """Per variant: the mean over seeds of the final test metric (the
    table's) and of the gradient evaluations the study spent."""
    rows = []
    for name, variant in result["variants"].items():
        value = variant["summary"][f"final_test_{args.metric}"]["mean"]
        if value is None:
            continue
        spent = [run["total_grad_evals"] for run in variant["runs"].values()]
        rows.append({"method": name, "value": value,
                     "grad_evals": sum(spent) / len(spent)})
    return rows


def final_verdict(result, args):
    """The verdict sentence (None with fewer than two variants)."""
    rows = verdict_rows(result, args)
    if len(rows) < 2:
        return None
    seeds = len(args.seed_list)
    return verdict(rows, "value",
                   f"mean final test {args.metric} over {seeds} seed"
                   f"{'s' if seeds > 1 else ''}",
                   higher_is_better=args.direction == "maximize",
                   spec=".3f" if args.metric == "accuracy" else ".2f",
                   baselines=("baseline",),
                   note="see the p-values in the table before trusting a "
                   "small margin")


if __name__ == "__main__":
    main()
