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

import jax
import jax.numpy as jnp
import numpy as np
import optuna
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


TASKS = list(tasks.TASKS)


@pytest.fixture(scope="module", params=TASKS)
def quick(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    hpo_run.main(["--quick", "--tasks", request.param, "--out", str(out)])
    with open(out / "hpo.json") as f:
        return json.load(f), out, request.param


def _hyper_count(method, task):
    """Floating hyperparameter coordinates a method tunes on a task."""
    problem = tasks.PROBLEMS[task.name]
    hp = M._gh_start(method, problem, task)
    return sum(int(x.size) for x in jax.tree.leaves(hp))


def _per_step(method, task, cfg, m_val):
    """G per model step of a gradhpo method, from cost.py's rules."""
    algorithm = tasks.PROBLEMS[task.name].gh_methods[method][0]
    val = m_val / cfg.batch_size
    if algorithm in ("t1t2", "greedy"):
        return 1 + cost.SECOND_ORDER + val
    if algorithm == "hyperdistill":
        # one more training gradient, at the distilled weights and batch
        return 2 + cost.SECOND_ORDER + val
    if algorithm.startswith("forward_mode"):
        # one JVP of the inner step per hyperparameter coordinate, and the
        # validation gradient on update calls only
        k = cfg.forward_interval if algorithm == "forward_mode" else 1
        return 1 + cost.SECOND_ORDER * _hyper_count(method, task) + val / k
    assert algorithm == "implicit"
    k = cfg.implicit_interval      # one CG solve per k steps
    solve = val + (cfg.implicit_terms + 2) * cost.SECOND_ORDER
    return 1 + solve / k


def test_schema_and_budgets(quick):
    result, out, name = quick
    assert set(result) >= {"config", "environment", "rows"}
    cfg = result["config"]
    assert cfg["quick"] is True and cfg["budgets"] == [1, 3]
    assert cfg["datasets"] == {name: "digits"}
    assert cfg["search_spaces"][name] == tasks.PROBLEMS[name].space
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
    applicable = [m for m in M.methods_of(tasks.PROBLEMS[name])
                  if m in M.DEFAULT_METHODS]
    assert {m for m, _ in present} == set(applicable)
    for method in applicable:
        budgets = [1] if method in M.REFERENCES else [1, 3]
        for b in budgets:
            assert (method, b) in present, (method, b)
    # the searches use more than one model at 3x; gradhpo tunes at 3x,
    # and at 1x equals the untuned default (no hyper-step fits)
    by = {(r["method"], r["budget"]): r for r in rows}
    assert by[("random", 3)]["models_trained"] == 3
    # (and so does the population search, reduced to one member at 1x)
    for method in [m for m in tasks.PROBLEMS[name].gh_methods
                   if m in M.DEFAULT_METHODS] + list(M.POPULATION):
        assert by[(method, 1)]["hyper_steps"] == 0
        assert by[(method, 1)]["test_accuracy"] == pytest.approx(
            by[("default", 1)]["test_accuracy"], abs=1e-6)
        assert by[(method, 3)]["hyper_steps"] > 0
    assert (out / f"{name}_accuracy.png").stat().st_size > 1000
    assert len(result["summary"]) == len(present)


def test_gradhpo_rows_charge_the_library_count(quick):
    result, _, name = quick
    cfg = M.Config(**{k: result["config"][k] for k in
                      M.Config.__dataclass_fields__})
    task = tasks.TASKS[name](0, quick=True)
    for row in result["rows"]:
        if row["method"] not in M.GRADHPO:
            continue
        expected = row["hyper_steps"] * _per_step(
            row["method"], task, cfg, cfg.batch_size)
        assert row["library_grad_evals"] == pytest.approx(expected)


def test_population_rows_charge_members_rungs_and_survivor(quick):
    """gh_population: every member step at gh_t1t2's library cost, one
    validation evaluation per live member at each rung plus the
    survivor's, and a tested model trained exactly S steps."""
    result, _, name = quick
    cfg = M.Config(**{k: result["config"][k] for k in
                      M.Config.__dataclass_fields__})
    task = tasks.TASKS[name](0, quick=True)
    rows = [r for r in result["rows"] if r["method"] in M.POPULATION]
    assert {r["budget"] for r in rows} == {1, 3}
    for row in rows:
        per_step = _per_step(M.POPULATION_MEMBER, task, cfg,
                             cfg.batch_size)
        assert row["library_grad_evals"] == pytest.approx(
            row["hyper_steps"] * per_step)
        sizes, rungs = row["population_sizes"], row["population_rungs"]
        assert sizes[0] == row["population_size"] == row["models_trained"]
        assert row["eval_grad_evals"] == pytest.approx(
            sum(sizes) * M.eval_cost(task.n_val, cfg))
        # halving by eta = 3 down to one survivor
        for a, b in zip(sizes, sizes[1:]):
            assert b == max(1, a // M.POPULATION_ETA)
        assert sizes[-1] == 1
        member_steps = sum(sizes[i] * (rungs[i] - (rungs[i - 1] if i else 0))
                           for i in range(len(sizes) - 1))
        start = rungs[len(sizes) - 2] if len(sizes) > 1 else 0
        survivor_hyper = row["hyper_steps"] - member_steps
        assert 0 <= survivor_hyper
        assert start + survivor_hyper + row["plain_steps"] == cfg.steps
    by = {r["budget"]: r for r in rows}
    assert by[1]["population_size"] == 1
    assert by[3]["population_size"] > 1


@pytest.mark.parametrize("name,method", [
    ("hyper_cleaning", "gh_t1t2"), ("hyper_cleaning", "gh_greedy"),
    ("hyper_cleaning", "gh_implicit"), ("lr_momentum_wd", "gh_forward_mode"),
    ("lr_momentum_wd", "gh_forward_mode_every_step"),
    ("augmentation", "gh_hyperdistill"),
    ("l2_small_data", "gh_implicit_per_weight")])
def test_library_count_of_a_short_run(name, method):
    """A short run's metadata equals cost.py's rules (an independent
    check of what the benchmark charges)."""
    cfg = hpo_run.QUICK
    problem = tasks.PROBLEMS[name]
    task = tasks.TASKS[name](0, quick=True)
    opt = M.make_optimizer(method, problem, cfg)
    calls, per_call = M.block_shape(method, problem, cfg)
    steps = 2 * calls * per_call
    order = M.batch_order(task.n_train, cfg.batch_size, steps,
                          M._rng(0, 1, 0))
    val_order = M.batch_order(task.n_val, cfg.batch_size, steps,
                              M._rng(0, 2, 0))
    batches = M._Batches(task, per_call, order, val_order)
    state = M._init(opt, method, problem, task,
                    M._gh_start(method, problem, task), batches)
    for c in range(2 * calls):
        state = opt.step(state, *batches.call(c * per_call))
    counted = float(state.metadata["grad_evals"])
    assert counted == pytest.approx(steps * _per_step(
        method, task, cfg, cfg.batch_size))
    assert M.probe_block_cost(opt, method, problem, task,
                              cfg) == pytest.approx(counted / 2)


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


def test_plain_training_is_the_tasks_optimizer():
    """The benchmark's plain training (baselines, trials, retrains) on
    ``lr_momentum_wd`` equals a hand-written SGD with momentum and
    decoupled weight decay at the same hyperparameters."""
    problem = tasks.PROBLEMS["lr_momentum_wd"]
    task = problem.load(0, quick=True)
    lr, mom, wd = 0.2, 0.7, 1e-3
    hp = tasks._lr_hp(lr, mom, wd)
    cfg = M.Config(steps=3, batch_size=16)
    order = M.batch_order(task.n_train, cfg.batch_size, 3, M._rng(0, 1))
    led = M.Ledger(problem, task, cfg, 1)
    params, _ = led.train(problem.init_params(task), None, hp, order)
    assert led.plain_steps == 3
    w = problem.init_params(task)
    buf = jax.tree.map(jnp.zeros_like, w)
    for idx in order:
        batch = (task.x_train[idx], task.y_train[idx], idx, 0)
        g = jax.grad(problem.train_loss)(w, hp, batch)
        g = jax.tree.map(lambda gi, wi: gi + wd * wi, g, w)
        buf = jax.tree.map(lambda b, gi: mom * b + gi, buf, g)
        w = jax.tree.map(lambda wi, b: wi - lr * b, w, buf)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(w)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_search_spaces_map_to_the_sampled_values():
    """Optuna's sampled values reach the model in the tasks'
    parametrisations (log, logit, per-layer)."""
    task = tasks.TASKS["lr_momentum_wd"](0, quick=True)
    hp = tasks.PROBLEMS["lr_momentum_wd"].suggest(optuna.trial.FixedTrial(
        {"lr": 0.3, "momentum": 0.8, "weight_decay": 1e-4}), task)
    d = tasks._lr_diagnostics(task, hp)
    assert d["final_lr"] == pytest.approx(0.3, rel=1e-6)
    assert d["final_momentum"] == pytest.approx(0.8, rel=1e-6)
    assert d["final_weight_decay"] == pytest.approx(1e-4, rel=1e-5)
    l2 = tasks.TASKS["l2_small_data"](0, quick=True)
    hp = tasks.PROBLEMS["l2_small_data"].suggest(optuna.trial.FixedTrial(
        {"l2_l0": 1e-3, "l2_l1": 1e-5, "l2_l2": 0.05}), l2)
    got = tasks._l2_diagnostics(l2, hp)
    assert [got[f"final_l2_l{i}"] for i in range(3)] == pytest.approx(
        [1e-3, 1e-5, 0.05], rel=1e-5)
    # per-example weights: sigmoid(logit(w)) = w, ends clipped
    w = np.array([0.0, 0.25, 0.5, 0.9, 1.0])
    back = jax.nn.sigmoid(tasks._weights_to_logits(w))
    np.testing.assert_allclose(back, w, atol=1e-7)


def test_per_weight_variant_matches_per_layer_at_equal_values():
    """gradhpo's per-weight start broadcasts the per-layer default, so
    both variants define the same training loss."""
    problem = tasks.PROBLEMS["l2_small_data"]
    task = problem.load(1, quick=True)
    params = problem.init_params(task)
    layer = problem.gh_init(task, "per_layer")
    weight = problem.gh_init(task, "per_weight")
    assert weight["log_l2"]["l1"].shape == params["l1"]["W"].shape
    batch = (task.x_train[:8], task.y_train[:8], jnp.arange(8), 0)
    a = problem.train_loss(params, layer, batch)
    b = problem.train_loss(params, weight, batch)
    assert float(a) == pytest.approx(float(b), rel=1e-6)
    # and the penalty is exp(rho) |W|^2 / 2 summed over the three layers
    ce = jnp.mean(tasks.cross_entropy(
        tasks.mlp_predict(params, batch[0]), batch[1]))
    pen = sum(float(jnp.sum(params[k]["W"] ** 2)) for k in params)
    assert float(a) == pytest.approx(
        float(ce) + 0.5 * tasks.L2_DEFAULT * pen, rel=1e-5)


def test_merge_concatenates_runs_and_refuses_overlaps(quick, tmp_path):
    """``--merge`` recomputes the summary from the union of the rows."""
    result, _, name = quick
    a = dict(result, rows=[r for r in result["rows"] if r["budget"] == 1])
    b = dict(result, rows=[r for r in result["rows"] if r["budget"] == 3])
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    merged = hpo_run.main(["--merge", str(pa), str(pb),
                           "--out", str(tmp_path / "m")])
    assert len(merged["rows"]) == len(result["rows"])
    assert merged["summary"] == result["summary"]
    assert merged["config"]["runs"][0]["tasks"] == [name]
    # a repeated row that agrees is kept once; one that disagrees fails
    again = hpo_run.main(["--merge", str(pa), str(pa), str(pb),
                          "--out", str(tmp_path / "m2")])
    assert len(again["rows"]) == len(result["rows"])
    changed = json.loads(pa.read_text())
    changed["rows"][0]["test_accuracy"] += 0.01
    pc = tmp_path / "c.json"
    pc.write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="disagree"):
        hpo_run.main(["--merge", str(pa), str(pc), "--out",
                      str(tmp_path / "x")])


def test_augmentation_pieces_match_library_references():
    """The benchmark's fast translation and convolution equal
    ``jax.scipy.ndimage.map_coordinates`` (bilinear, zero fill) and
    ``lax.conv_general_dilated`` (padding 1)."""
    from jax.scipy.ndimage import map_coordinates
    x = jax.random.uniform(jax.random.PRNGKey(0), (3, 8, 8, 1))
    shifts = jnp.array([[0.3, -1.7], [2.0, 0.5], [-0.2, -2.0]])
    rows, cols = jnp.meshgrid(jnp.arange(8.0), jnp.arange(8.0),
                              indexing="ij")
    ref = jnp.stack([map_coordinates(x[i, ..., 0], [rows - shifts[i, 0],
                                                    cols - shifts[i, 1]],
                                     order=1, mode="constant", cval=0.0)
                     for i in range(3)])
    np.testing.assert_allclose(tasks.translate(x, shifts)[..., 0], ref,
                               atol=1e-6)
    h = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
    k = jax.random.normal(jax.random.PRNGKey(2), (3, 3, 3, 5))
    for stride in (1, 2):
        ref = jax.lax.conv_general_dilated(
            h, k, (stride, stride), ((1, 1), (1, 1)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(tasks._conv(h, k, stride), ref,
                                   atol=1e-5)


def test_every_method_has_its_own_colour():
    """The plots tell methods apart: one fixed, distinct colour each."""
    from hpo import report
    assert set(M.METHODS) <= set(report.COLOURS)
    colours = [report.COLOURS[m] for m in M.METHODS]
    assert len(set(colours)) == len(colours)
