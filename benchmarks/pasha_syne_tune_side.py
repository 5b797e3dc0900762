"""The syne-tune side of ``pasha_syne_tune.py`` (run with syne-tune's python).

Reads the learning curves from a JSON file, drives syne-tune's
``HyperbandScheduler(type="pasha")`` with one simulated worker (a new trial
is started only when no paused trial can be promoted; a trial reports one
resource unit at a time until the scheduler pauses or stops it) and writes,
for every report, the scheduler's maximum resource after it.

Usage: python pasha_syne_tune_side.py CURVES.json OUT.json

syne-tune is not a dependency of gradhpo: install it in its own virtual
environment (``pip install syne-tune==0.13.0``).
"""

import datetime
import json
import sys

from syne_tune.backend.trial_status import Trial
from syne_tune.config_space import randint
from syne_tune.optimizer.scheduler import SchedulerDecision
from syne_tune.optimizer.schedulers import HyperbandScheduler


def run(curves, r, eta, max_t):
    n = len(curves)
    scheduler = HyperbandScheduler(
        {"cfg": randint(0, 10 * n), "epochs": max_t},
        type="pasha", searcher="random", metric="loss", mode="min",
        resource_attr="epoch", max_t=max_t, grace_period=r,
        reduction_factor=eta, max_resource_attr="epochs",
        points_to_evaluate=[{"cfg": i} for i in range(n)],
        random_seed=0)
    rungs = scheduler.terminator._rung_systems[0]
    trials, progress, tops, events, reports = {}, {}, [], [], []
    next_id = 0
    while True:
        suggestion = scheduler.suggest(next_id)
        if suggestion is None:      # no promotion and no config left
            break
        if suggestion.spawn_new_trial_id:
            if next_id == n:
                break
            config = suggestion.config
            assert config["cfg"] == next_id, config
            trial = Trial(trial_id=next_id, config=config,
                          creation_time=datetime.datetime.now())
            trials[next_id] = trial
            progress[next_id] = 0
            scheduler.on_trial_add(trial)
            tid = next_id
            next_id += 1
        else:
            tid = suggestion.checkpoint_trial_id
            events.append(["resume", tid, progress[tid]])
        trial = trials[tid]
        cfg = trial.config["cfg"]
        while True:
            epoch = progress[tid] + 1
            progress[tid] = epoch
            result = {"loss": curves[cfg][epoch - 1], "epoch": epoch}
            decision = scheduler.on_trial_result(trial, result)
            tops.append(int(rungs.current_max_t))
            reports.append([cfg, epoch])
            if decision == SchedulerDecision.CONTINUE and epoch < max_t:
                continue
            if epoch >= max_t:
                scheduler.on_trial_complete(trial, result)
                events.append(["complete", tid, epoch])
            else:
                events.append(["pause" if decision == SchedulerDecision.PAUSE
                               else "stop", tid, epoch])
            break
    return {"top_rung": tops, "events": events, "reports": reports,
            "steps": {str(k): v for k, v in progress.items()}}


def main(argv):
    with open(argv[1]) as f:
        spec = json.load(f)
    out = [run(c, spec["r"], spec["eta"], spec["max_t"])
           for c in spec["curves"]]
    with open(argv[2], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv)
