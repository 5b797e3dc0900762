r"""Populations: ``jax.vmap`` of a hyper-step against a Python loop.

For every population size :math:`n \in \{1, 2, 4, \dots, 64\}` (``--sizes``)
and every algorithm (``--algorithms``; T1–T2 exact by default, with T1–T2
finite difference and HyperDistill optional), two rows are timed side by side
in one run:

* ``vmap``: :func:`gradhpo.init_population` stacks the states of :math:`n`
  hyperparameter settings on a leading axis, and
  ``jax.jit(jax.vmap(opt.step, in_axes=(0, None, None)))`` advances all of
  them on the same batch in one XLA program;
* ``loop``: the same :math:`n` states, unstacked, advanced by a Python loop
  calling ``opt.step`` once per configuration (the library's compiled step,
  which compiles once and never retraces).

Two problems (``--problem``), both the MLP of ``step_cost.py``
(``make_problem``: one L2 coefficient per weight, ``lambda = exp(rho)``, SGD
with momentum 0.9 inside, Adam outside):

* ``digits`` (default): scikit-learn's digits size, 64-32-10 with batch 32
  (2,410 weights). A step of one configuration is a few hundred small XLA
  operations, so on a CPU its time is the per-operation overhead, not
  arithmetic; ``vmap`` turns n small operations into one of n times the
  size. This is the regime of many small trials a scheduler samples.
* ``mnist``: 784-64-64-10 with batch 128 (55k weights). One configuration
  already keeps both CPU cores busy with its matrix products, so ``vmap``
  cannot do fewer floating-point operations than the loop and the two run
  at about the same speed; on an accelerator the same population fills
  the device instead.

``--hidden``, ``--batch`` and ``--side`` override a preset. The :math:`n`
settings differ in their initial L2 coefficient, log-spaced from ``1e-5``
to ``1e-2``; all members start from the same weights.

Timing uses ``_common``: every case compiled and warmed up, a sample of each
case calibrated to about ``--sample-seconds``, then ``--rounds`` rounds in a
rotating order. Reported per population size: configurations per second of
both rows, and the speed-up (median over rounds of the per-round ratio
loop time / vmap time, with its interquartile range). The goal from the
issue: at least 5x the loop at 32 configurations.

Example:
  cd benchmarks
  python population.py --out results/population_digits.json
  python population.py --problem mnist --out results/population_mnist.json
  python population.py --problem mnist --hidden 512,512 --sizes 1,8,32
  python benchmarks/population.py --quick
"""

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Sequence

import jax
import jax.numpy as jnp
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as cm  # noqa: E402
    import step_cost as sc  # noqa: E402
else:  # pragma: no cover -- imported as benchmarks.population
    from benchmarks import _common as cm
    from benchmarks import step_cost as sc

from gradhpo.utils.parallel import init_population, unstack  # noqa: E402

ALGORITHMS = ("t1t2_exact", "t1t2_fd", "hyperdistill")
GOAL_SIZE = 32
GOAL_SPEEDUP = 5.0
# (input side, hidden sizes, batch) of each problem preset
PROBLEMS = {"digits": (8, "32", 32), "mnist": (28, "64,64", 128)}


def make_optimizer(alg: str, pb: "sc.Problem"):
    """The optimizer of one algorithm on the step-cost problem."""
    if alg == "hyperdistill":
        from gradhpo.algorithms.online import HyperDistill
        return HyperDistill(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                            gamma=0.9, theta=1.0)
    from gradhpo.algorithms.t1_t2 import T1T2
    mode = "exact" if alg == "t1t2_exact" else "finite_difference"
    return T1T2(pb.train_loss, pb.val_loss, pb.inner, pb.outer,
                hypergradient=mode, fd_radius=pb.fd_radius)


def settings(pb: "sc.Problem", n: int) -> List[Any]:
    """``n`` hyperparameter settings: L2 log-spaced in [1e-5, 1e-2]."""
    l2 = np.logspace(-5, -2, n) if n > 1 else np.array([1e-4])
    return [jax.tree.map(lambda r, v=v: jnp.full_like(r, np.log(v)),
                         pb.hyperparams)
            for v in l2]


def _population(alg: str, pb: "sc.Problem", n: int):
    opt = make_optimizer(alg, pb)
    kwargs = {"batch": pb.train_batch} if alg == "hyperdistill" else {}
    return opt, init_population(opt, pb.params, settings(pb, n), **kwargs)


def build_vmap(alg: str, n: int):
    def build(pb):
        opt, states = _population(alg, pb, n)
        step = jax.jit(jax.vmap(opt.step, in_axes=(0, None, None)))
        return step, states, (pb.train_batch, pb.val_batch)
    return build


def build_loop(alg: str, n: int):
    def build(pb):
        opt, states = _population(alg, pb, n)

        def step(members, train_batch, val_batch):
            return [opt.step(s, train_batch, val_batch) for s in members]
        return step, unstack(states), (pb.train_batch, pb.val_batch)
    return build


def cases(algs: Sequence[str], sizes: Sequence[int]) -> List[cm.Case]:
    rows = []
    for alg in algs:
        for n in sizes:
            rows.append(cm.Case(
                f"{alg}_loop_{n}", build_loop(alg, n), per_call=n,
                description=f"Python loop of opt.step over {n} states"))
            rows.append(cm.Case(
                f"{alg}_vmap_{n}", build_vmap(alg, n), per_call=n,
                reference=f"{alg}_loop_{n}",
                description=f"jit(vmap(opt.step)) over {n} stacked states"))
    return rows


def population_rows(algs, sizes, times, built) -> List[Dict[str, Any]]:
    """One flat row per (algorithm, population size)."""
    compile_s = {b.case.name: b.compile_seconds for b in built}
    calls = {b.case.name: b.calls for b in built}
    rows = []
    for alg in algs:
        for n in sizes:
            loop, vmap = f"{alg}_loop_{n}", f"{alg}_vmap_{n}"
            if loop not in times or vmap not in times:
                continue
            speed = sorted(a / b for a, b in zip(times[loop], times[vmap]))
            lo, hi = ((speed[0], speed[-1]) if len(speed) < 4 else
                      tuple(statistics.quantiles(speed, n=4)[::2]))
            t_loop = statistics.median(times[loop])
            t_vmap = statistics.median(times[vmap])
            goal = GOAL_SPEEDUP if n == GOAL_SIZE else None
            median_speed = statistics.median(speed)
            rows.append({
                "name": f"{alg}_{n}", "alg": alg, "configurations": n,
                "loop_seconds_per_config": t_loop,
                "vmap_seconds_per_config": t_vmap,
                "loop_configs_per_second": 1.0 / t_loop,
                "vmap_configs_per_second": 1.0 / t_vmap,
                "speedup": median_speed,
                "speedup_iqr_low": lo, "speedup_iqr_high": hi,
                "goal_speedup": goal,
                "pass": None if goal is None else bool(median_speed >= goal),
                "loop_calls_per_sample": calls[loop],
                "vmap_calls_per_sample": calls[vmap],
                "vmap_compile_seconds": compile_s[vmap],
            })
    return rows


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = (f"{'algorithm':<13} {'n':>3} {'loop cfg/s':>11} "
              f"{'vmap cfg/s':>11} {'speed-up':>9} {'IQR':>13} {'goal':>6}"
              "  ok")
    lines = [header, "-" * len(header)]
    for r in rows:
        goal = "" if r["goal_speedup"] is None else f">={r['goal_speedup']:g}"
        ok = "" if r["pass"] is None else ("yes" if r["pass"] else "NO")
        iqr = f"{r['speedup_iqr_low']:.2f}-{r['speedup_iqr_high']:.2f}"
        lines.append(
            f"{r['alg']:<13} {r['configurations']:>3} "
            f"{r['loop_configs_per_second']:>11.1f} "
            f"{r['vmap_configs_per_second']:>11.1f} "
            f"{r['speedup']:>8.2f}x {iqr:>13} {goal:>6}  {ok}")
    lines.append("cfg/s: configurations advanced by one hyper-step per "
                 "second; speed-up: median over rounds of loop time / vmap "
                 "time")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="sizes 1,2,4, hidden 16,16, batch 16, 3 rounds "
                   "(a smoke test)")
    p.add_argument("--sizes", default=None,
                   help="population sizes (default 1,2,4,8,16,32,64)")
    p.add_argument("--algorithms", default="t1t2_exact",
                   help="comma-separated subset of " + ", ".join(ALGORITHMS))
    p.add_argument("--problem", choices=sorted(PROBLEMS), default="digits",
                   help="preset: digits = 64-32-10 MLP, batch 32; mnist = "
                   "784-64-64-10 MLP, batch 128")
    p.add_argument("--hidden", default=None,
                   help="MLP hidden sizes (default: the preset's; quick "
                   "16,16)")
    p.add_argument("--side", type=int, default=None,
                   help="inputs are side x side images (default: the "
                   "preset's, 8 or 28)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size (default: the preset's; quick 16)")
    p.add_argument("--rounds", type=int, default=None,
                   help="timed rounds (default 15, quick 3)")
    p.add_argument("--sample-seconds", type=float, default=None,
                   help="target length of one timed sample (default 0.1, "
                   "quick 0.005)")
    p.add_argument("--calls", type=int, default=0,
                   help="calls per sample for every case; 0 = calibrate")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed calls per case (default 2, quick 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write a JSON report here")
    return p.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    quick = args.quick
    sizes = sc._ints(args.sizes or ("1,2,4" if quick
                                    else "1,2,4,8,16,32,64"))
    side, preset_hidden, preset_batch = PROBLEMS[args.problem]
    side = args.side or side
    hidden = sc._ints(args.hidden or ("16,16" if quick else preset_hidden))
    batch = args.batch or (16 if quick else preset_batch)
    rounds = args.rounds or (3 if quick else 15)
    sample_seconds = args.sample_seconds or (0.005 if quick else 0.1)
    warmup = args.warmup if args.warmup is not None else (1 if quick else 2)
    algs = [a for a in args.algorithms.split(",") if a]
    unknown = set(algs) - set(ALGORITHMS)
    if unknown:
        raise SystemExit(f"--algorithms: unknown {sorted(unknown)}; known: "
                         f"{list(ALGORITHMS)}")
    pb = sc.make_problem(
        "mlp", hidden=hidden, channels=(4, 8), batch=batch, side=side,
        inner_lr=0.05, momentum=0.9, outer_lr=1e-2, l2_init=1e-4,
        fd_radius=0.01, seed=args.seed)
    date = datetime.datetime.now().isoformat(timespec="seconds")
    load_start = cm.load_average()
    print(f"population ({args.problem}): {pb.config['architecture']}, "
          f"batch {batch}, "
          f"{pb.config['n_params']:,} params, "
          f"{pb.config['n_hyperparams']:,} hyperparams per configuration; "
          f"sizes {sizes}; {', '.join(algs)}")
    print(f"jax {jax.__version__} on {jax.default_backend()}; load average "
          f"{load_start}; compiling and warming up...")
    start = time.perf_counter()
    built = cm.build_cases(cases(algs, sizes), pb, warmup=warmup)
    calls = cm.calibrate_calls(built, sample_seconds, args.calls)
    print(f"timing {len(built)} cases x {rounds} rounds, alternating")
    times = cm.time_alternating(built, rounds)
    rows = population_rows(algs, sizes, times, built)
    elapsed = time.perf_counter() - start
    load_end = cm.load_average()

    print()
    print(format_table(rows))
    goals = [r for r in rows if r["pass"] is not None]
    all_pass = all(r["pass"] for r in goals) if goals else None
    print(f"\ngoal (>= {GOAL_SPEEDUP:g}x the loop at {GOAL_SIZE} "
          f"configurations) "
          f"{'n/a' if all_pass is None else 'met' if all_pass else 'NOT met'}"
          f"; {elapsed:.1f} s total; load average {load_start} -> "
          f"{load_end}")

    report = {
        "benchmark": "population",
        "command": " ".join([os.path.basename(sys.argv[0])]
                            + list(argv if argv is not None
                                   else sys.argv[1:])),
        "date": date,
        "config": dict(pb.config, problem=args.problem, sizes=sizes,
                       algorithms=algs,
                       rounds=rounds, calls=calls, warmup=warmup,
                       quick=quick, sample_seconds=sample_seconds,
                       settings="initial L2 log-spaced in [1e-5, 1e-2]; "
                                "shared initial weights and batches"),
        "environment": dict(cm.environment(), load_average_start=load_start,
                            load_average_end=load_end),
        "goal": {"configurations": GOAL_SIZE, "speedup": GOAL_SPEEDUP},
        "rows": rows,
        "all_goals_pass": all_pass,
        "seconds_total": elapsed,
    }
    if args.out:
        cm.write_json(args.out, report)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
