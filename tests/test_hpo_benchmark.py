"""The HPO benchmark (benchmarks/hpo): quick mode, JSON schema, accounting.

Runs ``run.py --quick`` in process on scikit-learn digits and checks the
report's structure (every key and type, fractions in [0, 1], every method
at every budget, counted costs within the budget), then checks the cost
accounting of the gradhpo rows against the rules of
``gradhpo.utils.cost`` independently of the benchmark's own bookkeeping.
"""

import json
import math
import os
import sys

import jax.numpy as jnp
import pytest

from gradhpo.utils import cost

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from hpo import methods as M  # noqa: E402
from hpo import run as hpo_run  # noqa: E402
from hpo import tasks  # noqa: E402

ROW_KEYS = {"task": str, "dataset": str, "method": str, "budget": int,
            "seed": int, "test_accuracy": float, "test_loss": float,
            "val_accuracy": float, "grad_evals": float, "seconds": float,
            "budget_grad_evals": float, "library_grad_evals": float,
            "plain_steps": int, "eval_grad_evals": float,
            "hyper_steps": int, "models_trained": int}


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("hpo")
    hpo_run.main(["--quick", "--out", str(out)])
    with open(out / "hpo.json") as f:
        return json.load(f), out


def _per_step(method, cfg, m_val):
    """G per model step of a gradhpo method, from cost.py's rules."""
    val = m_val / cfg.batch_size
    if method in ("gh_t1t2", "gh_greedy"):
        return 1 + cost.SECOND_ORDER + val
    k = cfg.implicit_interval      # one CG solve per k steps
    solve = val + (cfg.implicit_terms + 2) * cost.SECOND_ORDER
    return 1 + solve / k


def test_schema_and_budgets(quick):
    result, out = quick
    assert set(result) >= {"config", "environment", "rows"}
    cfg = result["config"]
    assert cfg["quick"] is True and cfg["budgets"] == [1, 3]
    assert cfg["datasets"] == {"hyper_cleaning": "digits"}
    assert result["environment"]["jax"]
    rows = result["rows"]
    for row in rows:
        for key, typ in ROW_KEYS.items():
            assert isinstance(row[key], typ), (key, row)
        for key in ("test_accuracy", "val_accuracy"):
            assert 0.0 <= row[key] <= 1.0
        assert math.isfinite(row["test_loss"]) and row["test_loss"] > 0
        assert row["grad_evals"] > 0
        # the whole counted cost, by kind
        assert row["grad_evals"] == pytest.approx(
            row["library_grad_evals"] + row["plain_steps"]
            + row["eval_grad_evals"])
        # within the budget: B (S + one validation evaluation), which is
        # B S (1 + 5 %) here; tpe_sh's first trial may exceed by its
        # intermediate reports
        steps = cfg["steps"]
        assert row["budget_grad_evals"] <= row["budget"] * steps * 1.05
        slack = 1.05 if row["method"] == "tpe_sh" else 1.0 + 1e-9
        assert row["grad_evals"] <= row["budget_grad_evals"] * slack
    present = {(r["method"], r["budget"]) for r in rows}
    for method in M.METHODS:
        budgets = [1] if method in M.REFERENCES else [1, 3]
        for b in budgets:
            assert (method, b) in present, (method, b)
    # the searches use more than one model at 3x; gradhpo tunes at 3x
    by = {(r["method"], r["budget"]): r for r in rows}
    assert by[("random", 3)]["models_trained"] == 3
    for method in M.GRADHPO:
        assert by[(method, 1)]["hyper_steps"] == 0
        assert by[(method, 3)]["hyper_steps"] > 0
    assert (out / "hyper_cleaning_accuracy.png").stat().st_size > 1000
    assert len(result["summary"]) == len(present)


def test_gradhpo_rows_charge_the_library_count(quick):
    result, _ = quick
    cfg = M.Config(**{k: result["config"][k] for k in
                      M.Config.__dataclass_fields__})
    for row in result["rows"]:
        if row["method"] not in M.GRADHPO:
            continue
        expected = row["hyper_steps"] * _per_step(
            row["method"], cfg, cfg.batch_size)
        assert row["library_grad_evals"] == pytest.approx(expected)


@pytest.mark.parametrize("method", M.GRADHPO)
def test_library_count_of_a_short_run(method):
    """A short run's metadata equals cost.py's rules (an independent
    check of what the benchmark charges)."""
    cfg = hpo_run.QUICK
    task = tasks.hyper_cleaning(0, quick=True)
    opt = M.make_optimizer(method, cfg)
    calls, per_call = M.block_shape(method, cfg)
    steps = 2 * calls * per_call
    order = M.batch_order(task.n_train, cfg.batch_size, steps,
                          M._rng(0, 1, 0))
    val_order = M.batch_order(task.n_val, cfg.batch_size, steps,
                              M._rng(0, 2, 0))
    batches = M._Batches(task, cfg, method, order, val_order)
    state = opt.init(tasks.init_params(task),
                     {"logit": jnp.zeros(task.n_train)})
    for c in range(2 * calls):
        state = opt.step(state, *batches.call(c * per_call))
    counted = float(state.metadata["grad_evals"])
    assert counted == pytest.approx(steps * _per_step(
        method, cfg, cfg.batch_size))
    assert M.probe_block_cost(opt, method, task, cfg) == pytest.approx(
        counted / 2)


def test_plain_and_evaluation_costs():
    cfg = M.Config(steps=10, batch_size=20)
    task = tasks.hyper_cleaning(1, quick=True)
    row = M.run("oracle", task, cfg, 1, 1)
    assert row["plain_steps"] == 10
    assert row["eval_grad_evals"] == pytest.approx(task.n_val / 60)
    assert row["grad_evals"] == pytest.approx(10 + task.n_val / 60)
    full = M.run("default_full_budget", task, cfg, 3, 1)
    assert full["train_steps"] == int(3 * (10 + task.n_val / 60)
                                      - task.n_val / 60)


def test_corruption_and_split_are_seeded():
    a = tasks.hyper_cleaning(2, quick=True)
    b = tasks.hyper_cleaning(2, quick=True)
    assert (a.clean == b.clean).all()
    assert abs(a.clean.mean() - 0.6) < 0.01
    assert a.n_train + a.n_val + len(a.y_test) == 1797
    assert a.n_train == 1797 * 5000 // 10000
