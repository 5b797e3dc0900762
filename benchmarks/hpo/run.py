"""HPO benchmark: gradhpo against Optuna at equal counted compute.

Usage::

    python benchmarks/hpo/run.py --quick --out /tmp/hpo_quick     # < 60 s
    python benchmarks/hpo/run.py --tasks hyper_cleaning l2_small_data \\
        --seeds 5 --budgets 1,3,10 --out /tmp/hpo

Writes ``OUT/hpo.json`` (``config``, ``environment``, ``rows``: one per
task, method, budget and seed) and one PNG per task, and prints a table of
mean ± std test accuracy (with Wilcoxon p-values against ``tpe`` from 5
seeds). The accounting and the budgets are described in
``benchmarks/hpo/methods.py`` and docs/hpo_benchmark.rst.
"""

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if os.path.dirname(HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(HERE))

import jax  # noqa: E402
import optuna  # noqa: E402

import gradhpo  # noqa: E402
from hpo import methods as M  # noqa: E402
from hpo import report, tasks  # noqa: E402

QUICK = M.Config(steps=40, batch_size=32)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="digits, S=40, 1 seed, budgets 1,3 (< 60 s)")
    p.add_argument("--tasks", nargs="+", default=list(tasks.TASKS),
                   choices=list(tasks.TASKS),
                   help="tasks to run (default: all)")
    p.add_argument("--methods", nargs="+", default=list(M.DEFAULT_METHODS),
                   choices=M.METHODS,
                   help="methods to run where they apply (default: all "
                        "but the ablations, "
                        f"{', '.join(M.ABLATIONS)})")
    p.add_argument("--seeds", type=int, default=None,
                   help="paired seeds 0..N-1 (default 1 quick, 3 full)")
    p.add_argument("--first-seed", type=int, default=0,
                   help="the first seed (seeds FIRST..FIRST+N-1), to add "
                        "seeds to an earlier run with --merge")
    p.add_argument("--budgets", default=None,
                   help="comma-separated multiples of S (default 1,3 "
                        "quick, 1,3,10 full)")
    p.add_argument("--steps", type=int, default=None, help="S")
    p.add_argument("--data-dir", default=None,
                   help="folder of the MNIST t10k files (default "
                        "../shared/data/mnist from the repository root)")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="run nothing: merge these hpo.json files (for "
                        "example one per task) into OUT/hpo.json, with the "
                        "table, the tests and the plots recomputed")
    p.add_argument("--out", required=True, help="output folder")
    return p.parse_args(argv)


def finish(result: dict, out: str) -> dict:
    """Adds the summary, the Wilcoxon tests and the plots to ``result``
    (``config``, ``environment``, ``rows``), prints the table and writes
    ``out/hpo.json``."""
    rows = result["rows"]
    summary = report.summarize(rows)
    tests = report.wilcoxon_vs(rows)
    print(report.format_table(summary, tests))
    plots = report.plot(summary, result["config"].get("datasets", {}), out)
    result = dict(config=result["config"],
                  environment=result["environment"], summary=summary,
                  wilcoxon_vs_tpe=tests,
                  plots=[os.path.basename(p) for p in plots], rows=rows)
    path = os.path.join(out, "hpo.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path} and {len(plots)} plot(s)")
    return result


def main(argv=None) -> dict:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        parts = []
        for path in args.merge:
            with open(path) as f:
                parts.append(json.load(f))
        return finish(report.merge(parts), args.out)
    seeds = args.seeds or (1 if args.quick else 3)
    budgets = [int(b) for b in (args.budgets or
                                ("1,3" if args.quick else "1,3,10")
                                ).split(",")]
    if 1 not in budgets:
        budgets = [1] + budgets
    cfg = QUICK if args.quick else M.Config()
    if args.steps:
        cfg = dataclasses.replace(cfg, steps=args.steps)
    start = time.perf_counter()
    rows, sources, datasets = [], {}, {}
    for name in args.tasks:
        for seed in range(args.first_seed, args.first_seed + seeds):
            task = tasks.TASKS[name](seed, quick=args.quick,
                                     data_dir=args.data_dir)
            sources.setdefault(name, []).append(task.source)
            datasets[name] = task.dataset
            problem = tasks.PROBLEMS[name]
            for method in M.methods_of(problem):
                if method not in args.methods:
                    continue
                for budget in budgets:
                    if method in M.REFERENCES and budget != 1:
                        continue
                    row = dict(task=name, dataset=task.dataset,
                               method=method, budget=budget, seed=seed)
                    row.update(M.run(method, task, cfg, budget, seed))
                    rows.append(row)
                    print(f"{name} seed {seed} {method:<20} {budget:>3}×: "
                          f"test acc {row['test_accuracy']:.4f}, "
                          f"{row['grad_evals']:.0f} G "
                          f"({row['seconds']:.1f} s)", flush=True)
    result = {
        "config": dict(
            dataclasses.asdict(cfg), quick=args.quick, tasks=args.tasks,
            methods=args.methods, seeds=seeds, first_seed=args.first_seed,
            budgets=budgets,
            datasets=datasets, data_sources=sources,
            search_spaces={n: tasks.PROBLEMS[n].space for n in args.tasks},
            gradhpo_methods={n: {m: list(a) for m, a in
                                 tasks.PROBLEMS[n].gh_methods.items()}
                             for n in args.tasks},
            budget_unit="budget B buys B * (S + n_val / (3 m)) G: B plain "
                        "S-step runs, each scored once on the validation "
                        "set",
            cost_rules="gradhpo steps: state.metadata['grad_evals']; plain "
                       "training step: 1 G; forward-only evaluation of n "
                       "examples: n / (3 m) G",
            command=" ".join([os.path.basename(sys.argv[0])] + (
                argv if argv is not None else sys.argv[1:])),
            total_seconds=time.perf_counter() - start),
        "environment": dict(
            python=platform.python_version(), platform=platform.platform(),
            jax=jax.__version__, backend=jax.default_backend(),
            devices=[str(d) for d in jax.devices()],
            optuna=optuna.__version__, gradhpo=gradhpo.__version__,
            cpu_count=os.cpu_count()),
        "rows": rows,
    }
    result = finish(result, args.out)
    print(f"total {result['config']['total_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
