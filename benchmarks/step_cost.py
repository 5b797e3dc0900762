r"""Cost of one gradhpo hyper-step relative to a plain training step.

Measures, side by side in one run, on the same model and batch:

* ``plain``: a jitted optax training step (the baseline, 1.0x);
* ``two_grads``: two plain gradient evaluations in sequence (the "2 G"
  reference of ALGORITHMS.md §0.3);
* ``hand_exact``: a hand-written jitted one-step exact hypergradient (one
  :func:`jax.vjp` of the inner step w.r.t. the hyperparameters, the
  validation gradient at :math:`w_{t+1}`, Adam on the hyperparameters),
  written with jax/optax only;
* ``t1t2_exact``: ``gradhpo.algorithms.t1_t2.T1T2(hypergradient="exact")``;
* ``hand_fd``: a hand-written DARTS central-difference step (Liu et al.
  2019, eq. 8);
* ``t1t2_fd``: ``T1T2(hypergradient="finite_difference")``;
* optional rows for Greedy, HyperDistill and OneShotWarmStart when those
  modules exist (skipped otherwise).

The hyperparameters are one L2 coefficient per weight, log-parametrised:
:math:`\lambda = e^\rho` and

.. math::

   L_{tr}(w, \rho; D) = \mathrm{CE}(f_w(x), y)
       + \tfrac12 \sum_l \sum_{ij} e^{\rho_{l,ij}} W_{l,ij}^2,
   \qquad L_{val}(w; V) = \mathrm{CE}(f_w(x), y),

with :math:`\rho` a pytree shaped like the weight matrices (biases are not
penalised): about 670k hyperparameters for the MLP 784-512-512-10. The
inner optimizer is SGD with heavy-ball momentum (``--momentum``, 0.9 by
default), the outer optimizer Adam on :math:`\rho`.

Timing: every case is compiled and warmed up first; then for ``--rounds``
rounds each case is timed once (``calls`` consecutive calls, each fed the
previous output state) in an order rotated every round; the reported ratio
is the median over rounds of the per-round ratio (so a slow-down of the
shared machine during one round cancels). Run
``python benchmarks/step_cost.py --help`` for the options.

Example:
  python benchmarks/step_cost.py --out step_cost_mlp.json
  python benchmarks/step_cost.py --model cnn --out step_cost_cnn.json
  python benchmarks/step_cost.py --quick --hlo
"""

import argparse
import dataclasses
import os
import sys
import time
from typing import Any, Callable, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as cm  # noqa: E402
else:  # pragma: no cover -- imported as benchmarks.step_cost
    from benchmarks import _common as cm

from gradhpo.algorithms.t1_t2 import T1T2  # noqa: E402

BASE = "plain"

# Goals from the issues: the library within 10% of hand-written code.
GOAL_EXACT_VS_PLAIN = 2.75
GOAL_FD_VS_PLAIN = 3.0
GOAL_VS_HAND = 1.1


# --------------------------------------------------------------------------
# Problems


@dataclasses.dataclass
class Problem:
    """Everything a case needs: model, losses, optimizers, data."""

    model: str
    params: Any
    hyperparams: Any
    train_batch: Tuple[jax.Array, jax.Array]
    val_batch: Tuple[jax.Array, jax.Array]
    train_loss: Callable[..., jax.Array]
    val_loss: Callable[..., jax.Array]
    inner: optax.GradientTransformation
    outer: optax.GradientTransformation
    inner_lr: float
    momentum: float
    fd_radius: float
    config: Dict[str, Any]


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(
        logits, labels).mean()


def _penalty(params: Sequence[Dict[str, jax.Array]],
             rho: Sequence[jax.Array]) -> jax.Array:
    """½ Σ exp(ρ) ⊙ W² over the weight matrices (not the biases)."""
    return 0.5 * sum(jnp.sum(jnp.exp(r) * p["w"] ** 2)
                     for p, r in zip(params, rho))


def _mlp_apply(params, x):
    h = x
    for layer in params[:-1]:
        h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def _mlp_params(key, sizes):
    params = []
    for k, (n_in, n_out) in zip(jax.random.split(key, len(sizes) - 1),
                                zip(sizes[:-1], sizes[1:])):
        params.append({
            "w": jax.random.normal(k, (n_in, n_out)) * np.sqrt(2.0 / n_in),
            "b": jnp.zeros((n_out,))})
    return params


def _conv(x, w, stride):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _cnn_apply(params, x):
    """3x3 conv (stride 1) - relu - 3x3 conv (stride 2) - relu - dense."""
    h = jax.nn.relu(_conv(x, params[0]["w"], 1) + params[0]["b"])
    h = jax.nn.relu(_conv(h, params[1]["w"], 2) + params[1]["b"])
    h = h.reshape(h.shape[0], -1)
    return h @ params[2]["w"] + params[2]["b"]


def _cnn_params(key, channels, side):
    c1, c2 = channels
    k1, k2, k3 = jax.random.split(key, 3)
    flat = ((side + 1) // 2) ** 2 * c2
    return [
        {"w": jax.random.normal(k1, (3, 3, 1, c1)) * np.sqrt(2.0 / 9),
         "b": jnp.zeros((c1,))},
        {"w": jax.random.normal(k2, (3, 3, c1, c2)) * np.sqrt(2.0 / (9 * c1)),
         "b": jnp.zeros((c2,))},
        {"w": jax.random.normal(k3, (flat, 10)) * np.sqrt(1.0 / flat),
         "b": jnp.zeros((10,))},
    ]


def make_problem(model: str, *, hidden: Sequence[int], channels: Sequence[int],
                 batch: int, side: int, inner_lr: float, momentum: float,
                 outer_lr: float, l2_init: float, fd_radius: float,
                 seed: int) -> Problem:
    """Synthetic data (timing does not depend on the values) and a model."""
    kp, kx, ky, kvx, kvy = jax.random.split(jax.random.PRNGKey(seed), 5)
    if model == "mlp":
        sizes = [side * side] + list(hidden) + [10]
        params = _mlp_params(kp, sizes)
        apply = _mlp_apply
        shape = (batch, side * side)
        arch = "-".join(map(str, sizes))
    else:
        params = _cnn_params(kp, channels, side)
        apply = _cnn_apply
        shape = (batch, side, side, 1)
        arch = (f"conv3x3({channels[0]})-conv3x3/2({channels[1]})-"
                f"dense(10) on {side}x{side}x1")
    rho = [jnp.full(p["w"].shape, np.log(l2_init), jnp.float32)
           for p in params]

    def train_loss(w, hp, data):
        x, y = data
        return _cross_entropy(apply(w, x), y) + _penalty(w, hp)

    def val_loss(w, hp, data):
        del hp  # the validation loss does not depend on the penalty
        x, y = data
        return _cross_entropy(apply(w, x), y)

    train_batch = (jax.random.normal(kx, shape),
                   jax.random.randint(ky, (batch,), 0, 10))
    val_batch = (jax.random.normal(kvx, shape),
                 jax.random.randint(kvy, (batch,), 0, 10))
    inner = optax.sgd(inner_lr, momentum=momentum or None)
    outer = optax.adam(outer_lr)
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    n_hp = sum(int(np.size(x)) for x in jax.tree.leaves(rho))
    config = {
        "model": model, "architecture": arch, "batch": batch,
        "dtype": "float32", "n_params": n_params, "n_hyperparams": n_hp,
        "hyperparameters": "one L2 coefficient per weight, lambda = exp(rho)",
        "inner": f"sgd(lr={inner_lr}, momentum={momentum})",
        "outer": f"adam(lr={outer_lr})", "l2_init": l2_init,
        "fd_radius": fd_radius, "seed": seed,
    }
    return Problem(model, params, rho, train_batch, val_batch, train_loss,
                   val_loss, inner, outer, inner_lr, momentum, fd_radius,
                   config)


# --------------------------------------------------------------------------
# Cases: each build returns (jitted fn, first carry, extra args).


def build_plain(pb: Problem):
    """A plain jitted optax training step at fixed hyperparameters."""
    @jax.jit
    def step(carry, hp, data):
        w, s = carry
        g = jax.grad(pb.train_loss)(w, hp, data)
        updates, s = pb.inner.update(g, s, w)
        return optax.apply_updates(w, updates), s
    return step, (pb.params, pb.inner.init(pb.params)), (
        pb.hyperparams, pb.train_batch)


def build_two_grads(pb: Problem):
    """Two gradient evaluations in sequence (train at w, val at w - eta g)."""
    @jax.jit
    def step(w, hp, data, val_data):
        g = jax.grad(pb.train_loss)(w, hp, data)
        w = jax.tree.map(lambda a, b: a - pb.inner_lr * b, w, g)
        v = jax.grad(pb.val_loss)(w, hp, val_data)
        return jax.tree.map(lambda a, b: a - pb.inner_lr * b, w, v)
    return step, pb.params, (pb.hyperparams, pb.train_batch, pb.val_batch)


def _hand_carry(pb: Problem):
    return (pb.params, pb.inner.init(pb.params), pb.hyperparams,
            pb.outer.init(pb.hyperparams))


def build_hand_exact(pb: Problem):
    """One-step exact hypergradient, hand-written (ALGORITHMS.md §1.8)."""
    @jax.jit
    def step(carry, data, val_data):
        w, s, rho, r = carry

        def phi(rho_):
            g = jax.grad(pb.train_loss)(w, rho_, data)
            updates, s1 = pb.inner.update(g, s, w)
            return optax.apply_updates(w, updates), s1

        w1, pull, s1 = jax.vjp(phi, rho, has_aux=True)
        v = jax.grad(pb.val_loss)(w1, rho, val_data)
        (h,) = pull(v)
        updates, r1 = pb.outer.update(h, r, rho)
        return w1, s1, optax.apply_updates(rho, updates), r1
    return step, _hand_carry(pb), (pb.train_batch, pb.val_batch)


def build_hand_fd(pb: Problem):
    """DARTS second-order finite difference, hand-written (eq. 8).

    For heavy-ball SGD, dw+/dg = -eta, so u = -eta v and h = M^T u with
    M^T u ~ [grad_rho L_tr(w + eps u) - grad_rho L_tr(w - eps u)] / (2 eps),
    eps = r / ||u||.
    """
    grad_rho = jax.grad(pb.train_loss, argnums=1)

    @jax.jit
    def step(carry, data, val_data):
        w, s, rho, r = carry
        g = jax.grad(pb.train_loss)(w, rho, data)
        updates, s1 = pb.inner.update(g, s, w)
        w1 = optax.apply_updates(w, updates)
        v = jax.grad(pb.val_loss)(w1, rho, val_data)
        u = jax.tree.map(lambda x: -pb.inner_lr * x, v)
        eps = pb.fd_radius / optax.global_norm(u)
        plus = grad_rho(jax.tree.map(lambda a, b: a + eps * b, w, u), rho,
                        data)
        minus = grad_rho(jax.tree.map(lambda a, b: a - eps * b, w, u), rho,
                         data)
        h = jax.tree.map(lambda p, m: (p - m) / (2 * eps), plus, minus)
        updates, r1 = pb.outer.update(h, r, rho)
        return w1, s1, optax.apply_updates(rho, updates), r1
    return step, _hand_carry(pb), (pb.train_batch, pb.val_batch)


def _library_step(opt):
    """The library's own compiled step, called exactly as a user would."""
    def step(state, data, val_data):
        return opt.step(state, data, val_data)
    # Expose the underlying jit for HLO inspection.
    step.lower = lambda state, data, val_data: opt.step.__wrapped_jit__.lower(
        opt, state, data, val_data)
    return step


def build_t1t2(mode: str):
    def build(pb: Problem):
        opt = T1T2(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                   hypergradient=mode, fd_radius=pb.fd_radius)
        state = opt.init(pb.params, pb.hyperparams)
        return _library_step(opt), state, (pb.train_batch, pb.val_batch)
    return build


def _stack(batch, k):
    return jax.tree.map(lambda x: jnp.stack([x] * k), batch)


def build_greedy(horizon: int):
    def build(pb: Problem):
        from gradhpo.algorithms.greedy import Greedy
        opt = Greedy(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                     horizon=horizon, gamma=0.9)
        state = opt.init(pb.params, pb.hyperparams)
        # One train and one validation slice per inner step.
        return _library_step(opt), state, (_stack(pb.train_batch, horizon),
                                           _stack(pb.val_batch, horizon))
    return build


def build_hyperdistill(pb: Problem):
    from gradhpo.algorithms.online import HyperDistill
    opt = HyperDistill(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                       gamma=0.9, theta=1.0, seed=0)
    state = opt.init(pb.params, pb.hyperparams, batch=pb.train_batch)
    return _library_step(opt), state, (pb.train_batch, pb.val_batch)


def build_warm_start(lookahead: int):
    def build(pb: Problem):
        from gradhpo.algorithms.warm_start import OneShotWarmStart
        opt = OneShotWarmStart(pb.train_loss, pb.val_loss, pb.inner,
                               step_size=1e-3, num_steps=1,
                               lookahead=lookahead)
        state = opt.init(pb.params, pb.hyperparams)
        # K > 1 lookahead steps take a leading axis; one validation batch
        train = (_stack(pb.train_batch, lookahead) if lookahead > 1
                 else pb.train_batch)
        return _library_step(opt), state, (train, pb.val_batch)
    return build


def optional_modules() -> Dict[str, bool]:
    """Which optional algorithm modules import in this checkout."""
    found = {}
    for mod in ("greedy", "online", "warm_start"):
        try:
            __import__(f"gradhpo.algorithms.{mod}")
            found[mod] = True
        except ImportError:
            found[mod] = False
    return found


def cases(horizon: int = 5, lookahead: int = 1) -> List[cm.Case]:
    """The registry of rows. Add a :class:`~_common.Case` to add a row."""
    rows = [
        cm.Case(BASE, build_plain,
                description="jitted optax step, fixed lambda (1 G)"),
        cm.Case("two_grads", build_two_grads,
                description="two sequential gradient evaluations (2 G)"),
        cm.Case("hand_exact", build_hand_exact,
                description="hand-written vjp through the step + Adam"),
        cm.Case("t1t2_exact", build_t1t2("exact"), reference="hand_exact",
                goal_vs_base=GOAL_EXACT_VS_PLAIN,
                goal_vs_reference=GOAL_VS_HAND,
                description="T1T2(hypergradient='exact').step"),
        cm.Case("hand_fd", build_hand_fd,
                description="hand-written DARTS central difference + Adam"),
        cm.Case("t1t2_fd", build_t1t2("finite_difference"),
                reference="hand_fd", goal_vs_base=GOAL_FD_VS_PLAIN,
                goal_vs_reference=GOAL_VS_HAND,
                description="T1T2(hypergradient='finite_difference').step"),
    ]
    found = optional_modules()
    if found["greedy"]:
        rows.append(cm.Case(
            "greedy", build_greedy(horizon), per_call=horizon,
            description=f"Greedy(horizon={horizon}).step, per inner step"))
    if found["online"]:
        rows.append(cm.Case("hyperdistill", build_hyperdistill,
                            description="HyperDistill.step (online step)"))
    if found["warm_start"]:
        rows.append(cm.Case(
            "warm_start", build_warm_start(lookahead),
            description=f"OneShotWarmStart(lookahead={lookahead}), total"))
    return rows


# --------------------------------------------------------------------------
# Driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few rounds (a smoke test, < 30 s)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds (default 40, quick 4)")
    p.add_argument("--calls", type=int, default=0,
                   help="calls per timed sample for every case; 0 = "
                   "calibrate each case to about --sample-seconds")
    p.add_argument("--sample-seconds", type=float, default=None,
                   help="target length of one timed sample "
                   "(default 0.05, quick 0.005)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per case after compiling "
                   "(default 3, quick 1)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default 128, quick 16)")
    p.add_argument("--hidden", default=None,
                   help="MLP hidden sizes (default 512,512, quick 32,32)")
    p.add_argument("--channels", default=None,
                   help="CNN channels (default 16,32, quick 4,8)")
    p.add_argument("--momentum", type=float, default=0.9,
                   help="inner heavy-ball momentum (0 = plain SGD)")
    p.add_argument("--inner-lr", type=float, default=0.05)
    p.add_argument("--outer-lr", type=float, default=1e-2)
    p.add_argument("--l2-init", type=float, default=1e-4)
    p.add_argument("--fd-radius", type=float, default=0.01)
    p.add_argument("--horizon", type=int, default=5,
                   help="Greedy horizon (if gradhpo.algorithms.greedy exists)")
    p.add_argument("--lookahead", type=int, default=1,
                   help="OneShotWarmStart lookahead (if it exists)")
    p.add_argument("--cases", default=None,
                   help="comma-separated subset of rows (plain is always in)")
    p.add_argument("--hlo", action="store_true",
                   help="also report XLA flops, bytes and op counts per case")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write a JSON report here")
    return p.parse_args(argv)


def _ints(text):
    return [int(x) for x in text.split(",") if x]


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    quick = args.quick
    rounds = args.rounds or (4 if quick else 40)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 3)
    sample_seconds = args.sample_seconds or (0.005 if quick else 0.05)
    batch = args.batch or (16 if quick else 128)
    hidden = _ints(args.hidden or ("32,32" if quick else "512,512"))
    channels = _ints(args.channels or ("4,8" if quick else "16,32"))
    pb = make_problem(
        args.model, hidden=hidden, channels=channels, batch=batch, side=28,
        inner_lr=args.inner_lr, momentum=args.momentum,
        outer_lr=args.outer_lr, l2_init=args.l2_init,
        fd_radius=args.fd_radius, seed=args.seed)

    registry = cases(args.horizon, args.lookahead)
    if args.cases:
        wanted = set(args.cases.split(",")) | {BASE}
        unknown = wanted - {c.name for c in registry}
        if unknown:
            raise SystemExit(f"--cases: unknown row(s) {sorted(unknown)}; "
                             f"known: {[c.name for c in registry]}")
        registry = [c for c in registry if c.name in wanted]

    print(f"step_cost: {pb.config['architecture']}, batch {batch}, "
          f"{pb.config['n_params']:,} params, "
          f"{pb.config['n_hyperparams']:,} hyperparams, "
          f"inner {pb.config['inner']}, outer {pb.config['outer']}")
    print(f"jax {jax.__version__} on {jax.default_backend()}; "
          "compiling and warming up...")
    start = time.perf_counter()
    built = cm.build_cases(registry, pb, warmup=warmup)
    calls = cm.calibrate_calls(built, sample_seconds, args.calls)
    print(f"timing {len(built)} cases x {rounds} rounds, alternating; calls "
          "per sample: " + ", ".join(f"{k} {v}" for k, v in calls.items()))
    times = cm.time_alternating(built, rounds)
    rows = cm.summarize(built, times, BASE)
    elapsed = time.perf_counter() - start

    hlo = {}
    if args.hlo:
        for b in built:
            hlo[b.case.name] = cm.hlo_stats(b.fn, b.carry, *b.args)
            for row in rows:
                if row["name"] == b.case.name:
                    row["hlo"] = hlo[b.case.name]

    print()
    print(cm.format_table(rows, BASE))
    if hlo:
        print()
        print(format_hlo(hlo))
    goals = [r for r in rows if r["pass_vs_base"] is not None
             or r["pass_vs_reference"] is not None]
    all_pass = all(v is not False for r in goals
                   for v in (r["pass_vs_base"], r["pass_vs_reference"]))
    print(f"\ngoals {'met' if all_pass else 'NOT met'}; "
          f"{elapsed:.1f} s total (ratios: median over rounds of per-round "
          "ratios; IQR over rounds)")

    report = {
        "benchmark": "step_cost",
        "command": " ".join([os.path.basename(sys.argv[0])]
                            + list(argv if argv is not None
                                   else sys.argv[1:])),
        "config": dict(pb.config, rounds=rounds, calls=calls,
                       warmup=warmup, quick=quick,
                       sample_seconds=sample_seconds,
                       optional_modules=optional_modules()),
        "environment": cm.environment(),
        "base": BASE,
        "goals": {"t1t2_exact_vs_plain": GOAL_EXACT_VS_PLAIN,
                  "t1t2_fd_vs_plain": GOAL_FD_VS_PLAIN,
                  "library_vs_hand_written": GOAL_VS_HAND},
        "rows": rows,
        "all_goals_pass": all_pass,
        "seconds_total": elapsed,
    }
    if args.out:
        cm.write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


def format_hlo(hlo: Dict[str, Dict[str, Any]]) -> str:
    ops = list(next(iter(hlo.values()))["ops"])
    header = (f"{'case':<22} {'GFLOP':>8} {'MB moved':>9} "
              + " ".join(f"{o[:7]:>7}" for o in ops))
    lines = [header, "-" * len(header)]
    for name, st in hlo.items():
        lines.append(
            f"{name:<22} {st['flops'] / 1e9:>8.3f} "
            f"{st['bytes_accessed'] / 1e6:>9.1f} "
            + " ".join(f"{st['ops'][o]:>7d}" for o in ops))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
