r"""Tune a differentiable data augmentation by hypergradients (T1–T2).

The augmentation has two magnitudes :math:`m = (m_{shift}, m_{noise})`,
each in [0, 1] (``m = sigmoid(logit)``, so the bounds hold by construction):

.. math::

   \tilde x_i = \mathrm{translate}\big(x_i,\; m_{shift} S\, u_i\big)
                + m_{noise} \sigma\, z_i,
   \qquad u_i \sim U[-1, 1]^2,\; z_i \sim N(0, I),

a translation by a fractional number of pixels (bilinear resampling, zero
padding, at most ``S`` pixels per axis) followed by additive Gaussian pixel
noise of standard deviation at most ``sigma``. Both are smooth in :math:`m`,
so the training loss :math:`L_{tr}(w, m; D)` has a derivative in :math:`m`
and T1–T2 gives the one-step hypergradient :math:`dL_{val}(w_{t+1}(m))/dm`
with :math:`L_{val}` the plain cross-entropy of un-augmented validation
images.

The random draws :math:`u_i, z_i` are drawn on the host and carried *in the
training batch* (``batch["shift"]``, ``batch["pixel"]``), so the loss is a
deterministic function of ``(params, hyperparams, batch)``: the inner step
and its vector-Jacobian product see the same noise (ALGORITHMS.md §1.7,
pitfall 7), and HyperDistill can mix batches leaf by leaf.

The model is an MLP (two hidden layers) trained with SGD and momentum. The
script compares, on the same data order and noise draws:

- no augmentation (``m = 0``);
- a fixed grid of magnitudes ``m_shift = m_noise = g`` for ``g`` in
  ``--grid``, the best chosen by validation loss, given all together the
  largest budget any tuned method spent (see the accounting below);
- T1–T2 and HyperDistill (``--methods``) tuning ``m`` online from
  ``--init-magnitude``.

Cost accounting, in gradient evaluations G (one forward and backward pass of
the training loss on one training batch), as gradhpo itself counts them
(``state.metadata["grad_evals"]``, documented in ``gradhpo.utils.cost``):
a plain SGD step is 1 G; a T1–T2 step is 4 G here (the training gradient,
the validation gradient on a batch of the same size, and a second-order
product counted as 2 G); a HyperDistill step 5 G (one more training
gradient, at the distilled point; its decay factor is not re-estimated
here). The "no augmentation" row takes as many plain steps as a tuned run
and is charged their true cost, 1 G each. The grid is given the largest budget
:math:`B` a tuned method spent: each of its :math:`K` values trains for
:math:`\lfloor B/K - s\rfloor` plain steps (1 G each) and is charged
:math:`s` more for the validation pass that ranks it, a forward pass over
the :math:`n_v` validation images counted as a third of a gradient
evaluation per training batch, :math:`s = n_v / (3\,\mathrm{batch})`.
A grid row shows what that value cost; "grid (total)" the sum, at most
:math:`B`.

Data: scikit-learn's bundled digits (8×8, no download) by default;
``--data-dir`` reads MNIST IDX files through
``load_mnist_splits`` of the examples' support module ``data_utils.py``.

Examples::

    python examples/augmentation.py                  # digits, under a minute
    python examples/augmentation.py --methods T1-T2 --steps 3000
    python examples/augmentation.py --data-dir ../shared/data/mnist
"""

import argparse
import os
import time

from cli import (add_common_flags, dataset_name, fill_defaults, float_in,
                 fraction, legend_below, method_colours, name_list,
                 nonnegative_float, nonnegative_int, number_list,
                 positive_float, positive_int, progress, pyplot, quick_help,
                 saved_line, verdict, write_json)

METHODS = ("T1-T2", "HyperDistill")
NAMES = ("shift", "noise")


#: Defaults of the flags that --quick changes (their parser default is None,
#: so that a flag given explicitly wins).
NORMAL = dict(steps=1500, eval_every=50, hidden=256, max_train=0)
QUICK = dict(steps=40, eval_every=10, hidden=32, max_train=300)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="directory with MNIST IDX files "
                   "(default: scikit-learn's digits)")
    p.add_argument("--steps", type=positive_int,
                   help="inner steps of each tuned run (default "
                   f"{NORMAL['steps']})")
    p.add_argument("--batch-size", type=positive_int, default=64)
    p.add_argument("--hidden", type=positive_int,
                   help=f"default {NORMAL['hidden']}")
    p.add_argument("--lr", type=positive_float, default=0.05,
                   help="SGD learning rate (momentum 0.9)")
    p.add_argument("--outer-lr", type=positive_float, default=0.05,
                   help="Adam learning rate of the magnitude logits")
    p.add_argument("--init-magnitude", type=fraction, default=0.2,
                   help="initial m_shift = m_noise of the tuned runs, in "
                   "[0, 1]")
    p.add_argument("--max-shift", type=fraction, default=0.25,
                   help="largest translation (m = 1) as a fraction of the "
                   "image side, in [0, 1]")
    p.add_argument("--max-noise", type=nonnegative_float, default=0.5,
                   help="largest pixel-noise std (m = 1), pixels in [0, 1]")
    p.add_argument("--grid", default="0.2,0.5,0.8",
                   type=number_list(float_in(0.0, 1.0, low_open=True)),
                   help="fixed magnitudes m_shift = m_noise to compare, "
                   "in (0, 1]")
    p.add_argument("--methods", default="T1-T2,HyperDistill",
                   type=name_list(METHODS),
                   help="comma-separated tuned methods: T1-T2, HyperDistill")
    p.add_argument("--gamma", type=fraction, default=0.9,
                   help="HyperDistill discount, in [0, 1]")
    p.add_argument("--max-train", type=nonnegative_int,
                   help="use at most this many training examples (0: all; "
                   "default 0)")
    p.add_argument("--eval-every", type=positive_int,
                   help=f"default {NORMAL['eval_every']}")
    add_common_flags(p, out="runs/augmentation",
                     quick=quick_help("a few steps on a small subset (for "
                                      "tests)", NORMAL, QUICK))
    args = fill_defaults(p.parse_args(argv), NORMAL, QUICK)
    # both checked by their types: magnitudes in (0, 1], known methods
    args.grid_values = [float(g) for g in args.grid.split(",")]
    args.method_list = args.methods.split(",")
    return args


if __name__ == "__main__":
    parse_args()    # --help and usage errors before JAX loads

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.scipy.ndimage import map_coordinates  # noqa: E402

import gradhpo as gh  # noqa: E402

import data_utils  # noqa: E402  (the examples' data loaders)


# -- the differentiable augmentation ------------------------------------------

def translate(images, shifts):
    """Translates each image by a fractional shift, bilinearly, zero-padded.

    Args:
      images: ``(N, H, W, C)``.
      shifts: ``(N, 2)`` shifts ``(rows, columns)`` in pixels; output pixel
        ``(i, j)`` is input pixel ``(i - s_0, j - s_1)``, interpolated.

    Returns:
      ``(N, H, W, C)``, differentiable in ``images`` and ``shifts`` (away
      from integer shifts, where bilinear interpolation has a kink).
    """
    h, w = images.shape[1:3]
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=images.dtype),
                              jnp.arange(w, dtype=images.dtype),
                              indexing="ij")

    def one(image, shift):
        coords = [rows - shift[0], cols - shift[1]]
        channel = lambda c: map_coordinates(  # noqa: E731
            c, coords, order=1, mode="constant", cval=0.0)
        return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)

    return jax.vmap(one)(images, shifts.astype(images.dtype))


def augment(images, shift, noise, directions, pixel_noise):
    r"""Random translation plus Gaussian noise, both scaled by magnitudes.

    .. math::

       \tilde x_i = \mathrm{translate}(x_i, \mathrm{shift}\cdot u_i)
                    + \mathrm{noise}\cdot z_i

    Args:
      images: ``(N, H, W, C)`` images.
      shift: largest translation in pixels per axis (a traced scalar: this
        is what the hypergradient differentiates).
      noise: standard deviation of the pixel noise (a traced scalar).
      directions: :math:`u`, ``(N, 2)`` in [-1, 1], drawn outside the loss.
      pixel_noise: :math:`z`, shaped like ``images``, drawn outside.

    Returns:
      The augmented images.

    Example:
      >>> x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0)
      >>> y = augment(x, 1.0, 0.0, jnp.array([[0.5, 0.0]]), jnp.zeros_like(x))
      >>> [float(v) for v in y[0, 1:3, 1, 0]]
      [0.5, 0.5]
    """
    return translate(images, shift * directions) + noise * pixel_noise


def draw_noise(rng, n, image_shape, dtype=np.float32):
    """The random part of an augmented batch: ``u`` and ``z`` (numpy)."""
    return {"shift": rng.uniform(-1.0, 1.0, (n, 2)).astype(dtype),
            "pixel": rng.standard_normal((n,) + tuple(image_shape)
                                         ).astype(dtype)}


def magnitudes(hp):
    """``m = sigmoid(logit)`` in [0, 1]: (shift, noise) fractions."""
    return jax.nn.sigmoid(hp["logit"])


# -- data, model, losses ------------------------------------------------------

def load(args):
    """``(N, H, W, 1)`` float32 images in [0, 1] and int32 labels."""
    if args.data_dir:
        splits = data_utils.load_mnist_splits(args.data_dir, seed=args.seed)
        scale = 255.0
    else:
        splits = data_utils.load_digits_splits(seed=args.seed)
        scale = 16.0
    if splits.note:
        print(splits.note)
    out = []
    for x, y in (splits.train, splits.val, splits.test):
        out.append((jnp.asarray(x[..., None] / scale, jnp.float32),
                    jnp.asarray(y, jnp.int32)))
    if args.max_train:
        out[0] = (out[0][0][:args.max_train], out[0][1][:args.max_train])
    return out


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) * np.sqrt(2.0 / m),
             "b": jnp.zeros(n)} for k, m, n in zip(keys, sizes, sizes[1:])]


def logits(params, images):
    # Roughly centred by fixed constants (pixels in [0, 1], mostly
    # background), not per-pixel statistics: a translated image then goes
    # through the same affine map as an untranslated one.
    x = (images.reshape(len(images), -1) - 0.3) / 0.4
    for layer in params[:-1]:
        x = jax.nn.relu(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def cross_entropy(params, images, labels):
    return optax.softmax_cross_entropy_with_integer_labels(
        logits(params, images), labels).mean()


def make_losses(max_shift, max_noise):
    """``train_loss(w, hp, batch)`` on augmented images, ``val_loss`` plain.

    ``max_shift`` (pixels) and ``max_noise`` (pixel standard deviation) are
    :math:`S` and :math:`\\sigma`: the magnitudes at ``m = 1``.
    """
    def train_loss(params, hp, batch):
        m = magnitudes(hp)
        x = augment(batch["x"], m[0] * max_shift, m[1] * max_noise,
                    batch["shift"], batch["pixel"])
        return cross_entropy(params, x, batch["y"])

    def val_loss(params, hp, batch):
        del hp  # validation images are not augmented
        return cross_entropy(params, batch["x"], batch["y"])

    return train_loss, val_loss


def initial_hyperparams(magnitude):
    m = float(np.clip(magnitude, 1e-4, 1 - 1e-4))
    return {"logit": jnp.full((2,), np.log(m / (1 - m)), jnp.float32)}


@jax.jit
def evaluate(params, images, labels):
    out = logits(params, images)
    ce = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
    return ce, jnp.mean(jnp.argmax(out, -1) == labels)


# -- batches (a pure function of the seed and step) ---------------------------

def train_batch(train, args, step):
    rng = np.random.default_rng([args.seed, 0, step])
    idx = rng.integers(0, len(train[1]), args.batch_size)
    batch = {"x": train[0][idx], "y": train[1][idx]}
    batch.update(draw_noise(rng, args.batch_size, train[0].shape[1:]))
    return batch


def val_batch(val, args, step):
    rng = np.random.default_rng([args.seed, 1, step])
    idx = rng.integers(0, len(val[1]), args.batch_size)
    return {"x": val[0][idx], "y": val[1][idx]}


# -- the runs -----------------------------------------------------------------

def run_tuned(name, opt, params, hp, data, args):
    """T1–T2 or HyperDistill: returns the final state and the curve."""
    train, val, _ = data
    if name == "HyperDistill":
        state = opt.init(params, hp, batch=train_batch(train, args, 0),
                         key=jax.random.PRNGKey(args.seed))
    else:
        state = opt.init(params, hp)
    m = np.asarray(magnitudes(hp))
    curve = [{"step": 0, "val_loss": float(evaluate(params, *val)[0]),
              "grad_evals": 0.0, "shift": float(m[0]),
              "noise": float(m[1])}]                 # the initial point
    bar = progress(range(args.steps), desc=name, leave=False)
    for step in bar:
        state = opt.step(state, train_batch(train, args, step),
                         val_batch(val, args, step))
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            m = np.asarray(magnitudes(state.hyperparams))
            loss = float(evaluate(state.params, *val)[0])
            curve.append({"step": step + 1, "val_loss": loss,
                          "grad_evals": float(state.metadata["grad_evals"]),
                          "shift": float(m[0]), "noise": float(m[1])})
            bar.set_postfix(shift=f"{m[0]:.2f}", noise=f"{m[1]:.2f}")
    return state, curve


def make_plain_step(train_loss, inner):
    """One jitted SGD step with the magnitudes as a traced argument, so the
    baseline and every grid value share one compilation."""
    @jax.jit
    def step(params, opt_state, hp, batch):
        grads = jax.grad(train_loss)(params, hp, batch)
        updates, opt_state = inner.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state
    return step


def run_fixed(name, step_fn, inner, params, magnitude, data, args, steps):
    """Plain SGD with the magnitudes held at ``magnitude`` (0: none); the
    curve counts 1 G per step."""
    train, val, _ = data
    if magnitude == 0.0:  # exactly zero, not sigmoid of a large negative
        hp = {"logit": jnp.full((2,), -jnp.inf, jnp.float32)}
    else:
        hp = initial_hyperparams(magnitude)
    opt_state = inner.init(params)
    curve = [{"step": 0, "grad_evals": 0.0,
              "val_loss": float(evaluate(params, *val)[0])}]
    for step in progress(range(steps), desc=name, leave=False):
        params, opt_state = step_fn(params, opt_state, hp,
                                    train_batch(train, args, step))
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "grad_evals": float(step + 1),
                          "val_loss": float(evaluate(params, *val)[0])})
    return params, curve


# -- main ---------------------------------------------------------------------

def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    data = load(args)
    train, val, test = data
    side = train[0].shape[1]
    train_loss, val_loss = make_losses(args.max_shift * side, args.max_noise)
    sizes = (side * side, args.hidden, args.hidden, 10)
    params = init_mlp(jax.random.PRNGKey(args.seed), sizes)
    inner = optax.sgd(args.lr, momentum=0.9)
    hp0 = initial_hyperparams(args.init_magnitude)
    rows, curves = [], {}

    def add_row(name, p, evals, seconds, m, note=""):
        vloss, _ = evaluate(p, *val)
        _, acc = evaluate(p, *test)
        rows.append({"method": name, "val_loss": float(vloss),
                     "test_acc": float(acc), "grad_evals": float(evals),
                     "seconds": seconds, "shift": float(m[0]),
                     "noise": float(m[1]), "note": note})

    for name in args.method_list:
        opt = (gh.T1T2(train_loss, val_loss, inner, optax.adam(args.outer_lr))
               if name == "T1-T2" else
               gh.HyperDistill(train_loss, val_loss, inner,
                               optax.adam(args.outer_lr), gamma=args.gamma))
        start = time.perf_counter()
        state, curves[name] = run_tuned(name, opt, params, hp0, data, args)
        add_row(f"{name} tuned", state.params,
                state.metadata["grad_evals"], time.perf_counter() - start,
                np.asarray(magnitudes(state.hyperparams)))

    # the largest budget a tuned method spent, by the library's count
    budget = max(r["grad_evals"] for r in rows)
    step_fn = make_plain_step(train_loss, inner)
    start = time.perf_counter()
    p, curves["no augmentation"] = run_fixed(
        "no augmentation", step_fn, inner, params, 0.0, data, args,
        args.steps)
    add_row("no augmentation", p, args.steps, time.perf_counter() - start,
            (0.0, 0.0))
    # The grid shares the largest budget a tuned method spent, by the
    # library's count, split evenly over the grid values; each value pays
    # for its plain steps (1 G each) and the validation pass that ranks it.
    select = len(val[1]) / (3 * args.batch_size)
    grid_steps = max(1, int(budget / len(args.grid_values) - select))
    grid_rows = []
    for g in args.grid_values:
        name = f"fixed m={g:g}"
        start = time.perf_counter()
        p, curves[name] = run_fixed(name, step_fn, inner, params, g, data,
                                    args, grid_steps)
        add_row(name, p, grid_steps + select, time.perf_counter() - start,
                (g, g))
        grid_rows.append(rows[-1])
    best = min(grid_rows, key=lambda r: r["val_loss"])
    best["note"] = "best of grid"
    grid_total = {"method": "grid (total)", "grad_evals": sum(
        r["grad_evals"] for r in grid_rows), "seconds": sum(
        r["seconds"] for r in grid_rows), "budget": float(budget)}

    print_table(rows, grid_total)
    print(f"grad evals: tuned rows as counted by gradhpo; no augmentation "
          f"1 G per plain step; each grid value {grid_steps} plain steps "
          f"+ {select:.2f} G for its validation pass (a forward pass over "
          f"{len(val[1])} images), sharing the budget "
          f"{budget:.0f} G of the costliest tuned run")
    write_json(os.path.join(args.out, "results.json"),
               {"args": {k: v for k, v in vars(args).items()},
                "initial_magnitude": args.init_magnitude,
                "rows": rows, "grid_total": grid_total, "curves": curves},
               indent=1)
    plot(curves, args)
    print(saved_line(args.out, ["results.json", "augmentation.png"]))
    # the grid's pick by validation loss, charged the whole grid; the other
    # grid values are not rivals (picking one by test accuracy would select
    # on the test set)
    compared = [r for r in rows if r not in grid_rows] + [
        dict(best, grad_evals=grid_total["grad_evals"])]
    print(verdict(compared, "test_acc", "test accuracy",
                  baselines=("no augmentation", best["method"]),
                  note=f"{best['method']} is the grid's pick by validation "
                  "loss, charged the whole grid"))
    return rows


def print_table(rows, grid_total):
    print(f"{'method':<18} {'val loss':>9} {'test acc':>9} {'grad evals':>11}"
          f" {'time [s]':>9} {'m_shift':>8} {'m_noise':>8}")
    for r in rows:
        print(f"{r['method']:<18} {r['val_loss']:>9.4f} {r['test_acc']:>9.3f}"
              f" {r['grad_evals']:>11.0f} {r['seconds']:>9.1f}"
              f" {r['shift']:>8.3f} {r['noise']:>8.3f}  {r['note']}")
    print(f"{grid_total['method']:<18} {'':>9} {'':>9} "
          f"{grid_total['grad_evals']:>11.0f} {grid_total['seconds']:>9.1f}")


def plot(curves, args):
    """augmentation.png: the validation loss against gradient evaluations
    and the magnitudes against inner steps, both from 0; one colour per run
    in both panels (each line's ``gid`` is its run). Returns the figure."""
    plt = pyplot()
    fixed = [n for n in curves if "shift" not in curves[n][0]]
    colour = method_colours([n for n in curves if n not in fixed], fixed)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), layout="constrained")
    for name, curve in curves.items():
        tuned = name not in fixed
        axes[0].plot([c["grad_evals"] for c in curve],
                     [c["val_loss"] for c in curve], marker=".",
                     ls="-" if tuned else ":", color=colour[name],
                     label=f"{name} (tuned)" if tuned else name, gid=name)
        if tuned:
            for key, style in zip(NAMES, ("-", "--")):
                axes[1].plot([c["step"] for c in curve],
                             [c[key] for c in curve], style,
                             color=colour[name], gid=name)
        else:   # a fixed magnitude, the same for shift and noise
            m = (0.0 if name == "no augmentation"
                 else float(name.split("=")[1]))
            axes[1].axhline(m, color=colour[name], ls=":", gid=name)
    axes[0].set(xlabel="gradient evaluations (G)", ylabel="validation loss",
                title="validation loss (fixed magnitudes: dotted)")
    axes[1].set(xlabel="inner step (SGD update)", ylabel="magnitude m",
                ylim=(-0.02, 1.02),
                title="magnitudes: m_shift solid, m_noise dashed")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("Learned data augmentation (shift and pixel noise) of an "
                 f"MLP on {dataset_name(args.data_dir)}")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_below(fig, handles, labels, ncol=3)
    fig.savefig(os.path.join(args.out, "augmentation.png"), dpi=120)
    plt.close("all")
    return fig


if __name__ == "__main__":
    main()
