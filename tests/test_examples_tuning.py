"""End-to-end runs of examples/lr_tuning.py and examples/hyper_cleaning.py,
and float64 checks of the hypergradients they rely on."""

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import common  # noqa: E402
import hyper_cleaning  # noqa: E402
import lr_tuning  # noqa: E402
from example_checks import (  # noqa: E402
    check_colours, check_saved_line, check_verdict)


# -- learning-rate tuning -----------------------------------------------------

def test_lr_tuning_quick_run(tmp_path, capsys):
    rows = lr_tuning.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert check_saved_line(out, ["results.json", "schedule.png"]) == \
        tmp_path
    # the tuned runs against the grid's pick (charged the whole grid)
    compared = [r for r in result["rows"]
                if not r["method"].startswith("fixed")]
    assert len(compared) == 5
    check_verdict(out, compared, "test_acc")
    assert out.rstrip().splitlines()[-1].startswith("Verdict: ")
    # the plot: one colour per run in all panels, curves from 0
    figure = lr_tuning.plot(result["schedules"], result["curves"],
                            result["grid_best_lr"], lr_tuning.parse_args(
                                ["--quick", "--out", str(tmp_path)]))
    for line in check_colours(figure, set(result["curves"])):
        assert line.get_xdata()[0] == 0, line.get_gid()
    for curve in result["curves"].values():
        assert curve[0][0] == 0.0
    assert (tmp_path / "schedule.png").stat().st_size > 0
    names = [r["method"] for r in result["rows"]]
    assert names == ["T1-T2", "T1-T2 (inject)", "Greedy H=5",
                     "Greedy H=5 g=0", "fixed lr=0.03", "fixed lr=0.3",
                     names[-1]]
    assert names[-1].startswith("grid best (fixed lr=")
    assert [r["method"] for r in rows] == names
    assert all(math.isfinite(r["val_loss"]) and 0 <= r["test_acc"] <= 1
               for r in result["rows"])
    by_name = {r["method"]: r for r in result["rows"]}
    args = result["args"]
    steps, batch = args["steps"], args["batch_size"]
    # cost accounting (gradhpo.utils.cost): a tuned inner step is the
    # training gradient (1 G), a validation gradient on a batch of the
    # same size (1 G) and a second-order product (2 G): 4 G
    for name in ["T1-T2", "T1-T2 (inject)", "Greedy H=5", "Greedy H=5 g=0"]:
        assert by_name[name]["grad_evals"] == pytest.approx(4 * steps)
    # the grid of two rates shares that budget: plain steps at 1 G, and a
    # validation forward pass (a third of a gradient per batch) per rate
    _, val, _ = common.load_flat_splits(None, args["seed"],
                                        args["max_train"])
    select = len(val[0]) / (3 * batch)
    grid_steps = int(4 * steps / 2 - select)
    for name in ["fixed lr=0.03", "fixed lr=0.3"]:
        assert by_name[name]["grad_evals"] == pytest.approx(
            grid_steps + select)
    assert by_name[names[-1]]["grad_evals"] == pytest.approx(
        2 * (grid_steps + select))
    assert by_name[names[-1]]["grad_evals"] <= 4 * steps
    # the curves are on the same axis: a tuned run ends at its budget
    assert result["curves"]["T1-T2"][-1][0] == pytest.approx(4 * steps)
    assert result["curves"]["fixed lr=0.3"][-1][0] == grid_steps

    sched = result["schedules"]
    assert all(len(s["lr"]) == steps for s in sched.values())
    # the callable and inject_hyperparams optimizers give the same schedule
    np.testing.assert_allclose(sched["T1-T2 (inject)"]["lr"],
                               sched["T1-T2"]["lr"], rtol=1e-5)
    np.testing.assert_allclose(sched["T1-T2 (inject)"]["momentum"],
                               sched["T1-T2"]["momentum"], rtol=1e-5)
    init_lr = result["args"]["init_lr"]
    np.testing.assert_allclose(sched["T1-T2"]["lr"][0], init_lr, rtol=1e-6)
    for name in ["T1-T2", "Greedy H=5"]:
        assert abs(math.log(sched[name]["lr"][-1] / init_lr)) > 0.05
    # Greedy's rates are constant over each horizon of 5 inner steps
    greedy = np.reshape(sched["Greedy H=5"]["lr"], (-1, 5))
    np.testing.assert_array_equal(greedy, greedy[:, :1].repeat(5, 1))


def test_lr_hypergradient_equals_central_difference(x64):
    """d L_val(w1) / d(log_lr, mom_logit) from T1-T2 through the callable
    inner optimizer equals a central difference of the one-step objective
    written by hand (heavy ball with a non-zero buffer)."""
    rng = np.random.default_rng(0)
    params = [{"w": jnp.asarray(rng.normal(size=(3, 4))),
               "b": jnp.asarray(rng.normal(size=4))},
              {"w": jnp.asarray(rng.normal(size=(4, 10))),
               "b": jnp.zeros(10)}]
    train = (jnp.asarray(rng.normal(size=(5, 3))),
             jnp.asarray(rng.integers(0, 10, 5)))
    val = (jnp.asarray(rng.normal(size=(4, 3))),
           jnp.asarray(rng.integers(0, 10, 4)))
    buffer = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)),
                          params)
    hp = {"log_lr": jnp.log(0.2), "mom_logit": jnp.array(0.3)}
    loss = lr_tuning.make_train_loss(1e-2)
    opt = gh.T1T2(loss, lr_tuning.val_loss, lr_tuning.sgd_callable,
                  optax.sgd(1.0))
    state = opt.init(params, hp)
    state = state.replace(inner_opt_state=tuple(
        s._replace(trace=buffer) if isinstance(s, optax.TraceState) else s
        for s in state.inner_opt_state))
    h = opt.compute_hypergradient(state, train, val)

    def objective(log_lr, mom_logit):
        g = jax.grad(loss)(params, None, train)
        lr, mom = jnp.exp(log_lr), jax.nn.sigmoid(mom_logit)
        w1 = jax.tree.map(lambda p, m, gi: p - lr * (mom * m + gi),
                          params, buffer, g)
        return lr_tuning.val_loss(w1, None, val)

    eps = 1e-6
    for key, args in [("log_lr", lambda d: (hp["log_lr"] + d,
                                            hp["mom_logit"])),
                      ("mom_logit", lambda d: (hp["log_lr"],
                                               hp["mom_logit"] + d))]:
        fd = (objective(*args(eps)) - objective(*args(-eps))) / (2 * eps)
        np.testing.assert_allclose(h[key], fd, rtol=1e-6, atol=1e-10)


# -- data hyper-cleaning ------------------------------------------------------

def test_corrupt_labels_exact_fraction():
    labels = np.random.default_rng(3).integers(0, 10, 1079)
    noisy, mask = hyper_cleaning.corrupt_labels(labels, 0.3, seed=5)
    assert mask.sum() == round(0.3 * 1079) == 324
    np.testing.assert_array_equal(noisy != labels, mask)
    assert noisy.min() >= 0 and noisy.max() <= 9
    again, mask2 = hyper_cleaning.corrupt_labels(labels, 0.3, seed=5)
    np.testing.assert_array_equal(again, noisy)
    np.testing.assert_array_equal(mask2, mask)
    _, other = hyper_cleaning.corrupt_labels(labels, 0.3, seed=6)
    assert (other != mask).any()


def test_hyper_cleaning_quick_run(tmp_path, capsys):
    hyper_cleaning.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    assert check_saved_line(out, ["results.json", "weights.png"]) == \
        tmp_path
    # the oracle knows the corrupted labels: named, but not ranked
    winner = check_verdict(out, result["rows"][:1] + result["rows"][2:],
                           "test_acc")
    assert winner != "oracle (clean only)" and "oracle" in out.split(
        "Verdict: ")[1]
    assert (tmp_path / "weights.png").stat().st_size > 0
    by_name = {r["method"]: r for r in result["rows"]}
    assert list(by_name) == ["uniform weights", "oracle (clean only)",
                             "T1-T2", "Greedy H=5"]
    n = result["n_train"]
    assert n == 500                      # --quick keeps 500 examples
    assert result["n_corrupted"] == len(result["corrupted"]) == 150
    assert len(set(result["corrupted"])) == 150
    steps = result["args"]["steps"]
    # --val-batch-size 0: every validation gradient is on the whole
    # validation set, n_val / batch gradient evaluations, besides the
    # training gradient (1 G) and a second-order product (2 G) per step
    args = hyper_cleaning.parse_args(["--quick", "--out", str(tmp_path)])
    assert args.val_batch_size == 0
    _, val, _, _ = hyper_cleaning.load(args)
    per_step = 1 + 2 + len(val[1]) / args.batch_size
    assert per_step > 5                  # 359 validation digits / 128
    for name in ["T1-T2", "Greedy H=5"]:
        row = by_name[name]
        assert row["grad_evals"] == pytest.approx(per_step * steps)
        # the learned weights separate clean from corrupted examples
        assert row["auc"] > 0.8
        assert row["mean_w_clean"] > row["mean_w_corrupted"] + 0.3
        # cleaning helps over training on the corrupted data as it is
        assert row["test_acc"] > by_name["uniform weights"]["test_acc"]
    # plain steps at their true cost, 1 G each
    assert by_name["uniform weights"]["grad_evals"] == steps
    assert by_name["oracle (clean only)"]["grad_evals"] == steps


def test_hyper_cleaning_corrupts_the_loaded_training_labels():
    """The script's own split: exactly 30 % of the training labels differ
    from the clean ones, and the batch indices address the examples."""
    args = hyper_cleaning.parse_args(["--quick", "--out", "unused"])
    train, val, test, corrupted = hyper_cleaning.load(args)
    import data_utils
    clean = data_utils.load_digits_splits(seed=args.seed).train[1][:500]
    np.testing.assert_array_equal(np.asarray(train[1]) != clean, corrupted)
    assert corrupted.sum() == 150
    np.testing.assert_array_equal(train[2], np.arange(500))


def test_per_example_weight_hypergradient_equals_central_difference(x64):
    """T1-T2's hypergradient w.r.t. the per-example weight logits equals a
    central difference of the one-step objective written by hand (SGD with
    momentum, non-zero buffer), for examples in the batch; examples outside
    it get exactly zero."""
    rng = np.random.default_rng(1)
    n, d = 8, 3
    x = jnp.asarray(rng.normal(size=(n, d)))
    y = jnp.asarray(rng.integers(0, 10, n))
    params = hyper_cleaning.init_model(jax.random.PRNGKey(0), (d, 5, 10))
    idx = jnp.array([0, 2, 3, 5, 6])
    train = (x[idx], y[idx], idx)
    val = (jnp.asarray(rng.normal(size=(4, d))),
           jnp.asarray(rng.integers(0, 10, 4)))
    alpha = jnp.asarray(rng.normal(size=n))
    buffer = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)),
                          params)
    lr, mom = 0.1, 0.9
    opt = gh.T1T2(hyper_cleaning.train_loss, hyper_cleaning.val_loss,
                  optax.sgd(lr, momentum=mom), optax.adam(0.1))
    state = opt.init(params, {"alpha": alpha})
    state = state.replace(inner_opt_state=tuple(
        s._replace(trace=buffer) if isinstance(s, optax.TraceState) else s
        for s in state.inner_opt_state))
    h = np.asarray(opt.compute_hypergradient(state, train, val)["alpha"])

    def objective(a):
        xb, yb, ib = train
        w = jax.nn.sigmoid(a[ib])

        def weighted(p):
            ce = optax.softmax_cross_entropy_with_integer_labels(
                hyper_cleaning.logits(p, xb), yb)
            return jnp.sum(w * ce) / len(ib)
        g = jax.grad(weighted)(params)
        w1 = jax.tree.map(lambda p, m, gi: p - lr * (mom * m + gi),
                          params, buffer, g)
        return hyper_cleaning.val_loss(w1, None, val)

    eps = 1e-6
    for i in [0, 3, 6]:
        e = jnp.zeros(n).at[i].set(eps)
        fd = (objective(alpha + e) - objective(alpha - e)) / (2 * eps)
        np.testing.assert_allclose(h[i], fd, rtol=1e-6, atol=1e-12)
        assert abs(h[i]) > 1e-6
    np.testing.assert_array_equal(h[[1, 4, 7]], 0.0)
