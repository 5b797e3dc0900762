"""gh.PopulationSearch: vmapped members, halving, PBT, cost and tracing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh
from gradhpo.utils import cost

M_TRAIN, M_VAL, DIM = 4, 8, 3
#: T1T2's cost per step from cost.py's rules: the inner gradient, the VJP
#: through the step, and a validation gradient on twice the examples.
PER_STEP = 1 + cost.SECOND_ORDER + M_VAL / M_TRAIN


def train_loss(w, hp, batch):
    fit = 0.5 * jnp.mean(jnp.sum((w - batch) ** 2, axis=-1))
    return fit + 0.5 * jnp.sum(jnp.exp(hp["log_l2"]) * w ** 2)


def val_loss(w, hp, batch):
    return 0.5 * jnp.mean(jnp.sum((w - batch) ** 2, axis=-1))


def batches(t):
    """The (train, val) batches of step ``t`` (closed form, any dtype)."""
    base = jnp.arange(M_TRAIN * DIM, dtype=float).reshape(M_TRAIN, DIM)
    tr = 1.0 + 0.5 * jnp.sin(base + t)
    va = 1.0 + 0.1 * jnp.cos(jnp.arange(M_VAL * DIM, dtype=float)
                             .reshape(M_VAL, DIM) - t)
    return tr, va


def make_opt(outer=None):
    return gh.T1T2(train_loss, val_loss, optax.sgd(0.3, momentum=0.5),
                   outer if outer is not None else optax.adam(0.1))


def hp(v, n=()):
    return {"log_l2": jnp.full(n, v, dtype=float)}


@pytest.fixture
def x64():
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def _assert_trees(a, b, **tol):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def test_size_one_equals_the_optimizer_alone(x64):
    opt = make_opt()
    search = gh.PopulationSearch(opt, size=1, rung_steps=2)
    w0 = jnp.zeros(DIM)
    result = search.run(w0, [hp(-1.0)], batches, 7)
    assert result.history == [] and result.best_id == 0
    state = opt.init(w0, hp(-1.0))
    for t in range(7):
        state = opt.step(state, *batches(t))
    assert result.best.params.dtype == jnp.float64
    _assert_trees(result.best, state, rtol=1e-12, atol=1e-14)
    assert int(result.best.step) == 7
    assert result.grad_evals == pytest.approx(7 * PER_STEP)


def test_members_train_as_independent_runs():
    opt = make_opt()
    starts = [hp(v) for v in (-2.0, 0.0, 1.0)]
    search = gh.PopulationSearch(opt, size=3, rung_steps=100)
    pop = search.init(jnp.zeros(DIM), starts)
    for t in range(5):
        pop = search.step(pop, *batches(t))
    for i, start in enumerate(starts):
        state = opt.init(jnp.zeros(DIM), start)
        for t in range(5):
            state = opt.step(state, *batches(t))
        _assert_trees(pop.member(i), state, rtol=1e-5, atol=1e-6)
    # three distinct hypergradient trajectories
    assert len(set(np.round(np.asarray(
        pop.members.hyperparams["log_l2"]), 6))) == 3


def test_halving_keeps_the_members_with_the_best_scores():
    opt = make_opt()
    search = gh.PopulationSearch(opt, size=6, rung_steps=1)
    pop = search.init(jnp.zeros(DIM), [hp(float(i)) for i in range(6)])
    scores = jnp.array([5.0, 1.0, jnp.nan, 2.0, 4.0, 0.0])
    new, rung = search.select(pop, scores)
    # 6 // 3 = 2 survivors, best first; NaN counts as the worst
    assert new.ids.tolist() == [5, 1] and new.size == 2
    assert rung.survivors.tolist() == [5, 1]
    assert rung.parents.tolist() == [5, 1]
    assert rung.ids.tolist() == list(range(6))
    np.testing.assert_array_equal(new.members.hyperparams["log_l2"],
                                  [5.0, 1.0])
    halve = gh.PopulationSearch(opt, size=6, rung_steps=1,
                                reduction_factor=2)
    assert halve.select(pop, scores)[0].ids.tolist() == [5, 1, 3]
    # a size that does not divide keeps floor(n / eta), at least one
    assert search.select(new, jnp.array([1.0, 0.0]))[0].ids.tolist() == [1]


def test_halving_run_selects_by_score_at_each_rung():
    # the outer learning rate is 0, so the hyperparameters (and scores)
    # stay where they start: |hp - 0.3| gives the ranking by hand
    opt = make_opt(optax.sgd(0.0))
    values = [0.9, 0.05, 0.5, 0.31, 0.2, 0.7, 0.0, 0.45, 0.33]
    search = gh.PopulationSearch(
        opt, size=9, rung_steps=(2, 5),
        score_fn=lambda w, h: jnp.abs(h["log_l2"] - 0.3))
    result = search.run(jnp.zeros(DIM), [hp(v) for v in values], batches, 8)
    first, second = result.history
    assert (first.step, second.step) == (2, 5)
    assert first.survivors.tolist() == [3, 8, 4]
    np.testing.assert_allclose(first.scores, np.abs(np.array(values) - 0.3),
                               rtol=1e-6)
    np.testing.assert_allclose(first.hyperparams["log_l2"], values,
                               rtol=1e-6)
    assert second.ids.tolist() == [3, 8, 4]
    assert second.survivors.tolist() == [3]
    assert result.best_id == 3 and result.population.size == 1
    assert float(result.best.hyperparams["log_l2"]) == pytest.approx(0.31)
    assert int(result.best.step) == 8


def test_grad_evals_sum_over_members_and_stages():
    opt = make_opt()
    search = gh.PopulationSearch(opt, size=9, rung_steps=(2, 5))
    result = search.run(jnp.zeros(DIM), [hp(v) for v in np.linspace(
        -2, 2, 9)], batches, 8, score_batch=batches(0)[1])
    # 9 members x 2 steps, 3 x 3, then 1 x 3
    assert result.grad_evals == pytest.approx((9 * 2 + 3 * 3 + 3)
                                              * PER_STEP)
    assert [r.grad_evals for r in result.history] == pytest.approx(
        [18 * PER_STEP, 27 * PER_STEP])
    # the survivor's own count: its 8 steps
    assert float(result.best.metadata["grad_evals"]) == pytest.approx(
        8 * PER_STEP)
    # PBT copies add nothing: members x steps
    pbt = gh.PopulationSearch(opt, size=4, rung_steps=2, mode="pbt",
                              score_fn=lambda w, h: jnp.sum(w ** 2))
    out = pbt.run(jnp.zeros(DIM), [hp(v) for v in (-1., 0., 1., 2.)],
                  batches, 6)
    assert out.grad_evals == pytest.approx(4 * 6 * PER_STEP)
    assert len(out.history) == 3 and out.history[-1].final


def test_scores_default_to_the_validation_loss():
    opt = make_opt()
    search = gh.PopulationSearch(opt, size=3, rung_steps=1)
    pop = search.init(jnp.zeros(DIM), [hp(v) for v in (-1., 0., 1.)])
    pop = search.step(pop, *batches(0))
    vb = batches(3)[1]
    got = search.scores(pop, vb)
    want = [val_loss(pop.member(i).params, None, vb) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("perturbation,scale", [("multiply", 0.2),
                                                ("add", 0.5)])
def test_pbt_copies_the_best_and_perturbs_its_hyperparameters(
        perturbation, scale):
    opt = make_opt()
    search = gh.PopulationSearch(opt, size=4, rung_steps=1, mode="pbt",
                                 perturbation=perturbation,
                                 perturb_scale=scale)
    starts = [hp(v, (DIM,)) for v in (-1.0, -0.5, 0.5, 1.0)]
    pop = search.init(jnp.zeros(DIM), starts, key=jax.random.PRNGKey(3))
    for t in range(3):
        pop = search.step(pop, *batches(t))
    before = [pop.member(i) for i in range(4)]
    scores = jnp.array([3.0, 0.0, 2.0, 1.0])
    new, rung = search.select(pop, scores)
    # size 4, fraction 1/4: the worst (member 0) takes the best (member 1)
    assert new.ids.tolist() == [0, 1, 2, 3]
    assert rung.parents.tolist() == [1, 1, 2, 3]
    for i in (1, 2, 3):
        _assert_trees(new.member(i), before[i], rtol=0, atol=0)
    copy, best = new.member(0), before[1]
    for field in ("params", "inner_opt_state", "outer_opt_state", "step",
                  "metadata"):
        _assert_trees(getattr(copy, field), getattr(best, field),
                      rtol=0, atol=0)
    got = np.asarray(copy.hyperparams["log_l2"])
    ref = np.asarray(best.hyperparams["log_l2"])
    if perturbation == "multiply":
        factor = got / ref
        assert np.all(np.isclose(factor, 1 - scale, rtol=1e-6)
                      | np.isclose(factor, 1 + scale, rtol=1e-6)), factor
    else:
        step = got - ref
        assert np.all(np.isclose(step, -scale, atol=1e-6)
                      | np.isclose(step, scale, atol=1e-6)), step
    # the key moves on: a second selection draws other signs
    assert not np.array_equal(np.asarray(new.key), np.asarray(pop.key))


def test_pbt_fraction_pairs_the_jth_worst_with_the_jth_best():
    opt = make_opt()
    search = gh.PopulationSearch(opt, size=6, rung_steps=1, mode="pbt",
                                 exploit_fraction=0.5, perturb_scale=0.0)
    pop = search.init(jnp.zeros(DIM), [hp(float(i)) for i in range(6)])
    scores = jnp.array([0.5, 0.1, 0.9, 0.3, 0.7, 0.2])
    new, rung = search.select(pop, scores)
    # ranking 1, 5, 3, 0, 4, 2: 2 <- 1, 4 <- 5, 0 <- 3
    assert rung.parents.tolist() == [3, 1, 1, 3, 5, 5]
    np.testing.assert_array_equal(new.members.hyperparams["log_l2"],
                                  [3.0, 1.0, 1.0, 3.0, 5.0, 5.0])


def test_one_trace_per_population_size():
    traces = []

    def counted_loss(w, hp, batch):
        traces.append(1)
        return train_loss(w, hp, batch)

    opt = gh.T1T2(counted_loss, val_loss, optax.sgd(0.1), optax.adam(0.1))
    search = gh.PopulationSearch(opt, size=9, rung_steps=(2, 4),
                                 score_fn=lambda w, h: jnp.sum(w ** 2))
    pop = search.init(jnp.zeros(DIM), [hp(v) for v in np.linspace(
        -1, 1, 9)])
    pop = search.step(pop, *batches(0))
    after_first = len(traces)
    assert after_first > 0
    for t in range(1, 12):
        pop = search.step(pop, *batches(t))
    assert len(traces) == after_first      # no retrace per step
    starts = [hp(v) for v in np.linspace(-1, 1, 9)]
    search.run(jnp.zeros(DIM), starts, batches, 7)
    compiled_sizes = len(traces)
    # the sizes 3 and 1 traced the loss no more often than size 9 did
    assert compiled_sizes - after_first <= 2 * after_first


def test_iterable_batches_and_sampled_starts():
    opt = make_opt()
    search = gh.PopulationSearch(opt, size=3, rung_steps=2,
                                 score_fn=lambda w, h: jnp.sum(w ** 2))
    data = [batches(t) for t in range(4)]
    result = search.run(
        jnp.zeros(DIM),
        lambda key: {"log_l2": jax.random.normal(key, ())}, data, 4,
        key=jax.random.PRNGKey(1))
    assert int(result.best.step) == 4
    starts = np.asarray(result.history[0].hyperparams["log_l2"])
    assert len(set(starts.round(6))) == 3
    with pytest.raises(ValueError, match="batches ran out after 4"):
        search.run(jnp.zeros(DIM), [hp(0.0)] * 3, data, 5)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(size=0), ValueError, "size"),
    (dict(size=2.0), TypeError, "size"),
    (dict(rung_steps=0), ValueError, "rung_steps"),
    (dict(rung_steps=(3, 2)), ValueError, "rung_steps"),
    (dict(rung_steps="3"), TypeError, "rung_steps"),
    (dict(reduction_factor=1), ValueError, "reduction_factor"),
    (dict(mode="asha"), ValueError, "mode"),
    (dict(score_fn=3), TypeError, "score_fn"),
    (dict(exploit_fraction=0.7), ValueError, "exploit_fraction"),
    (dict(perturbation="scale"), ValueError, "perturbation"),
    (dict(perturb_scale=-1.0), ValueError, "perturb_scale"),
])
def test_arguments_are_checked(kwargs, error, match):
    args = dict(size=3, rung_steps=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        gh.PopulationSearch(make_opt(), **args)


def test_call_errors_name_the_argument():
    opt = make_opt()
    with pytest.raises(TypeError, match="optimizer"):
        gh.PopulationSearch(optax.sgd(0.1), size=2, rung_steps=1)
    search = gh.PopulationSearch(opt, size=3, rung_steps=1)
    with pytest.raises(ValueError, match="size=3"):
        search.init(jnp.zeros(DIM), [hp(0.0)] * 2)
    with pytest.raises(TypeError, match="hyperparams"):
        search.init(jnp.zeros(DIM), hp(0.0))
    with pytest.raises(ValueError, match="score_batch"):
        search.run(jnp.zeros(DIM), [hp(0.0)] * 3, batches, 3)
    pop = search.init(jnp.zeros(DIM), [hp(0.0)] * 3)
    with pytest.raises(ValueError, match="scores"):
        search.select(pop, jnp.zeros(2))
    with pytest.raises(TypeError, match="population"):
        search.step(pop.members, *batches(0))
    with pytest.raises(ValueError, match="num_steps"):
        search.run(jnp.zeros(DIM), [hp(0.0)] * 3, batches, 0,
                   score_batch=batches(0)[1])


def test_a_dropped_search_frees_its_optimizer():
    """Nothing compiled for a search keeps the optimizer (and what its
    losses close over) alive once the user drops both."""
    import gc
    import weakref

    def make():
        big = jnp.ones(1000)

        def loss(w, hp, batch):
            return train_loss(w, hp, batch) + 0.0 * big[0]
        return gh.T1T2(loss, val_loss, optax.sgd(0.1),
                       optax.adam(0.1)), big

    opt, big = make()
    alive = weakref.ref(big)
    search = gh.PopulationSearch(opt, size=3, rung_steps=2,
                                 score_fn=lambda w, h: jnp.sum(w ** 2))
    starts = [hp(v) for v in (-1.0, 0.0, 1.0)]
    search.run(jnp.zeros(DIM), starts, batches, 4)
    del opt, big, search
    gc.collect()
    assert alive() is None
