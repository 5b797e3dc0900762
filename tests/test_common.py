"""One test table that every algorithm passes, on a ridge problem and an MLP.

Each case builds an optimizer, an initial state and a function returning the
(train, val) batches of step i, laid out as the algorithm expects (a leading
horizon/lookahead axis where it takes several inner steps per call).
"""

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh

import problems as pb

HORIZON = 3     # Greedy inner steps per call
LOOKAHEAD = 2   # warm-start lookahead


@dataclasses.dataclass
class Case:
    name: str
    opt: Any
    state: Any
    batches: Callable[[int], Any]
    steps: int


def _ridge(make_opt, stacked, wrap, outer):
    train, val = pb.ridge_batches()

    def batches(i):
        del i
        return tuple(b if n is None else jax.tree.map(
            lambda x, n=n: jnp.stack([x] * n), b)
            for b, n in zip((train, val), stacked))
    opt = make_opt(wrap(pb.log_ridge_train_loss), pb.ridge_val_loss,
                   0.01, outer)
    return opt, batches, (
        jnp.zeros(2), {"log_l2": jnp.array(2.0)})


def _mlp(make_opt, stacked, wrap, outer):
    keys = jax.random.split(jax.random.PRNGKey(1), 64)

    def one(i):
        return pb.mlp_batch(keys[2 * i]), pb.mlp_batch(keys[2 * i + 1])

    def batches(i):
        n = max(k or 1 for k in stacked)
        parts = [one(n * i + j) for j in range(n)]
        return tuple(
            part[0] if k is None else jax.tree.map(
                lambda *xs: jnp.stack(xs), *part)
            for part, k in zip(zip(*parts), stacked))
    opt = make_opt(wrap(pb.mlp_train_loss), pb.mlp_val_loss, 0.1,
                   outer)
    return opt, batches, (
        pb.init_mlp(jax.random.PRNGKey(0)),
        {"log_l2": [jnp.array(1.0), jnp.array(1.0)],
         "smooth_logit": jnp.array(1.0)})


ALGORITHMS = {
    "t1t2_exact": (lambda tl, vl, lr, outer: gh.T1T2(
        tl, vl, optax.sgd(lr, momentum=0.5), outer), (None, None)),
    "t1t2_fd": (lambda tl, vl, lr, outer: gh.T1T2(
        tl, vl, optax.sgd(lr), outer,
        hypergradient="finite_difference"), (None, None)),
    "greedy": (lambda tl, vl, lr, outer: gh.Greedy(
        tl, vl, optax.sgd(lr), outer, horizon=HORIZON,
        gamma=0.9), (HORIZON, HORIZON)),
    "hyperdistill": (lambda tl, vl, lr, outer: gh.HyperDistill(
        tl, vl, optax.sgd(lr), outer, gamma=0.9), (None, None)),
    "warm_start": (lambda tl, vl, lr, outer: gh.OneShotWarmStart(
        tl, vl, optax.sgd(lr), outer, lookahead=LOOKAHEAD),
        (LOOKAHEAD, None)),
    "forward_mode": (lambda tl, vl, lr, outer: gh.ForwardMode(
        tl, vl, optax.sgd(lr, momentum=0.5), outer), (None, None)),
    "implicit_cg": (lambda tl, vl, lr, outer: gh.Implicit(
        tl, vl, optax.sgd(lr), outer, solver="cg", terms=5, damping=0.1),
        (None, None)),
    "implicit_neumann": (lambda tl, vl, lr, outer: gh.Implicit(
        tl, vl, optax.sgd(lr), outer, solver="neumann", terms=5,
        neumann_scale=lr), (None, None)),
}


def build(algorithm, problem, wrap=lambda loss: loss,
          outer=optax.adam(0.1)):
    """A case; ``wrap`` decorates the training loss (e.g. to count traces)."""
    make, stacked = ALGORITHMS[algorithm]
    opt, batches, (params, hp) = {"ridge": _ridge, "mlp": _mlp}[problem](
        make, stacked, wrap, outer)
    if algorithm == "hyperdistill":
        state = opt.init(params, hp, batch=batches(0)[0])
    else:
        state = opt.init(params, hp)
    return Case(f"{algorithm}-{problem}", opt, state, batches,
                steps=20 if problem == "ridge" else 12)


CASES = [(a, p) for a in ALGORITHMS for p in ["ridge", "mlp"]]


def _val_losses(case):
    state, losses = case.state, []
    for i in range(case.steps):
        state = case.opt.step(state, *case.batches(i % 4))
        losses.append(float(state.metadata["val_loss"]))
    return losses


@pytest.mark.parametrize("algorithm,problem", CASES)
def test_validation_loss_decreases(algorithm, problem):
    """Tuning lowers the validation loss, averaged along the run, below the
    same run with the hyperparameters frozen (outer learning rate 0) on the
    same batches; for the warm start (weights untouched) it lowers the
    lookahead loss."""
    tuned = _val_losses(build(algorithm, problem))
    frozen = _val_losses(build(algorithm, problem, outer=optax.sgd(0.0)))
    assert np.mean(tuned) < np.mean(frozen), (tuned, frozen)
    assert np.all(np.isfinite(tuned))


@pytest.mark.parametrize("algorithm,problem", CASES)
def test_state_structure_stable_and_finite(algorithm, problem):
    case = build(algorithm, problem)
    new = case.opt.step(case.state, *case.batches(0))
    assert (jax.tree.structure(new) == jax.tree.structure(case.state))
    chex.assert_trees_all_equal_shapes_and_dtypes(new, case.state)
    for leaf in jax.tree.leaves(new):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            assert np.all(np.isfinite(leaf))
    assert int(new.step) == 1
    h = case.opt.compute_hypergradient(case.state, *case.batches(0))
    assert jax.tree.structure(h) == jax.tree.structure(case.state.hyperparams)
    chex.assert_trees_all_equal_shapes_and_dtypes(h, case.state.hyperparams)
    chex.assert_tree_all_finite(h)


@pytest.mark.parametrize("algorithm,problem", CASES)
def test_step_does_not_retrace(algorithm, problem):
    traces = []

    def counting(loss):
        def wrapped(params, hp, batch):
            traces.append(1)
            return loss(params, hp, batch)
        return wrapped
    case = build(algorithm, problem, wrap=counting)
    state = case.opt.step(case.state, *case.batches(0))
    first = len(traces)
    assert first > 0
    for i in range(1, 6):
        state = case.opt.step(state, *case.batches(i % 4))
    assert len(traces) == first


@pytest.mark.parametrize("algorithm,problem", CASES)
def test_vmap_population_equals_loop(algorithm, problem):
    case = build(algorithm, problem)
    offsets = [-0.5, 0.0, 0.5]
    states = [case.state.replace(hyperparams=jax.tree.map(
        lambda x, o=o: x + o, case.state.hyperparams)) for o in offsets]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
    step = jax.vmap(case.opt.step, in_axes=(0, None, None))
    for i in range(2):
        batches = case.batches(i)
        stacked = step(stacked, *batches)
        states = [case.opt.step(s, *batches) for s in states]
    for i, single in enumerate(states):
        chex.assert_trees_all_close(
            jax.tree.map(lambda x: x[i], stacked), single,
            rtol=2e-5, atol=2e-6)
