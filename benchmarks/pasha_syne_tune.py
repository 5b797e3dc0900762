"""PASHA with pause and resume: gradhpo against syne-tune, report by report.

Simulates noisy power-law learning curves
:math:`y_i(e) = a_i + b_i e^{-c_i} + \\sigma \\xi_{i,e}` (resource
:math:`e = 1..R`), runs promotion-type PASHA with pause and resume through
gradhpo (:class:`gradhpo.integrations.resume.ResumableObjective` on an
in-memory Optuna study, one worker) and through syne-tune's
``HyperbandScheduler(type="pasha")`` (driven directly by
``pasha_syne_tune_side.py`` under syne-tune's own python), and records the
maximum resource (the level of the top rung, :math:`R` once the cap is
lifted) after every report. Both sides see the configurations in the same
order, start a new one only when no paused one can be promoted, and stop
when a new one would be needed after the last.

syne-tune is not a dependency: install it in a separate environment, e.g.
``python -m venv /tmp/st_venv && /tmp/st_venv/bin/pip install
syne-tune==0.13.0``, and pass its python with ``--syne-tune-python``
(without it only the gradhpo side runs).

Usage::

    python benchmarks/pasha_syne_tune.py --syne-tune-python \\
        /tmp/st_venv/bin/python --out benchmarks/results/pasha_syne_tune.json
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import optuna

from gradhpo.integrations.resume import PausingScheduler, ResumableObjective


def make_curves(seed, n_configs, max_t, noise):
    """``n_configs`` noisy power-law curves, values at resources 1..max_t."""
    rng = np.random.default_rng(seed)
    e = np.arange(1, max_t + 1)
    curves = []
    for _ in range(n_configs):
        a = rng.uniform(0.05, 0.3)
        b = rng.uniform(0.3, 0.8)
        c = rng.uniform(0.2, 1.0)
        curves.append((a + b * e ** (-c)
                       + noise * rng.standard_normal(max_t)).tolist())
    return curves


def run_gradhpo(curves, r, eta, max_t, epsilon="auto"):
    """One worker; returns the maximum resource after every report, the
    pause/resume events and the resource each configuration trained."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sched = PausingScheduler(r, eta, max_resource=max_t, epsilon=epsilon)
    tops, events, trained, ran, reports = [], [], {}, [], []

    def init(trial):
        trial.suggest_int("cfg", 0, len(curves) - 1)
        return {"e": np.asarray(0, np.int64)}

    def step(trial, state, e):
        cfg = trial.params["cfg"]
        assert int(state["e"]) == e - 1          # continues exactly
        trained.setdefault(cfg, []).append(e)
        return {"e": np.asarray(e, np.int64)}, curves[cfg][e - 1]

    def on_report(trial, e, value, max_resource):
        tops.append(int(max_resource))
        ran.append(trial.number)
        reports.append([trial.params["cfg"], e])

    with tempfile.TemporaryDirectory() as tmp:
        objective = ResumableObjective(init, step, sched,
                                       checkpoint_dir=tmp,
                                       on_report=on_report)
        study = optuna.create_study()
        next_cfg = 0
        while True:
            waiting = study.get_trials(
                deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
            if not waiting:
                if next_cfg == len(curves):
                    break
                study.enqueue_trial({"cfg": next_cfg})
                next_cfg += 1
            else:
                events.append(["resume", waiting[0].params["cfg"],
                               max(waiting[0].intermediate_values)])
            before = len(tops)
            study.optimize(objective, n_trials=1)
            if len(tops) > before:
                t = study.trials[ran[-1]]
                status = t.user_attrs["gradhpo:status"]
                events.append(["complete" if status == "complete" else
                               "pause", t.params["cfg"], t.last_step])
    return {"top_rung": tops, "events": events, "reports": reports,
            "steps": {str(k): len(v) for k, v in trained.items()},
            "distinct": all(len(v) == len(set(v)) for v in trained.values())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--configs", type=int, default=81)
    parser.add_argument("--max-t", type=int, default=100)
    parser.add_argument("--noise", type=float, default=0.02)
    parser.add_argument("--syne-tune-python", default=None)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    r, eta = 1, 3
    spec = {"r": r, "eta": eta, "max_t": args.max_t,
            "curves": [make_curves(s, args.configs, args.max_t, args.noise)
                       for s in range(args.seeds)]}
    ours = [run_gradhpo(c, r, eta, args.max_t) for c in spec["curves"]]
    theirs = [None] * args.seeds
    if args.syne_tune_python:
        side = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            "pasha_syne_tune_side.py")
        with tempfile.TemporaryDirectory() as tmp:
            spec_path = os.path.join(tmp, "curves.json")
            out_path = os.path.join(tmp, "out.json")
            with open(spec_path, "w") as f:
                json.dump(spec, f)
            env = dict(os.environ, PYTHONHASHSEED="0")
            subprocess.run([args.syne_tune_python, side, spec_path,
                            out_path], check=True, env=env,
                           stderr=subprocess.DEVNULL)
            with open(out_path) as f:
                theirs = json.load(f)
    seeds = []
    for s in range(args.seeds):
        row = {"seed": s, "top_rung_gradhpo": ours[s]["top_rung"],
               "steps_gradhpo": sum(ours[s]["steps"].values()),
               "no_step_trained_twice": ours[s]["distinct"]}
        if theirs[s] is not None:
            a, b = ours[s]["top_rung"], theirs[s]["top_rung"]
            first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y),
                         None if len(a) == len(b) else min(len(a), len(b)))
            row.update(top_rung_syne_tune=b,
                       steps_syne_tune=sum(theirs[s]["steps"].values()),
                       identical=first is None, first_difference=first,
                       same_reports=ours[s]["reports"]
                       == theirs[s]["reports"])
        seeds.append(row)
        print(f"seed {s}: reports gradhpo {len(ours[s]['top_rung'])}, "
              f"final top {ours[s]['top_rung'][-1]}"
              + ("" if theirs[s] is None else
                 f"; syne-tune {len(theirs[s]['top_rung'])}, final top "
                 f"{theirs[s]['top_rung'][-1]}; identical "
                 f"{row['identical']} (first difference at report "
                 f"{row['first_difference']}); same (configuration, "
                 f"resource) at every report {row['same_reports']}"))
    summary = [{"seed": row["seed"],
                "reports": len(row["top_rung_gradhpo"]),
                "final_top_gradhpo": row["top_rung_gradhpo"][-1],
                "final_top_syne_tune": (row["top_rung_syne_tune"][-1]
                                        if "top_rung_syne_tune" in row
                                        else None),
                "identical_top_rung": row.get("identical"),
                "same_reports": row.get("same_reports")} for row in seeds]
    config = {"r": r, "eta": eta, "max_t": args.max_t,
              "configs": args.configs, "noise": args.noise, "workers": 1,
              "epsilon": "auto",
              "syne_tune": "0.13.0" if args.syne_tune_python else None}
    result = {"summary": summary, "config": config, "seeds": seeds}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
