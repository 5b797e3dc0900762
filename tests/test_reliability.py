"""Reliability of every algorithm: NaN injection inside a jitted step,
determinism, and bit-exact checkpoints.

NaN injection follows optax's tests: a NaN is placed in a batch and the step
is run under :func:`jax.jit`. The contract (``BilevelOptimizer.step``): a
non-finite inner gradient leaves ``params`` and ``inner_opt_state``
unchanged, a non-finite hypergradient leaves ``hyperparams`` and
``outer_opt_state`` unchanged, and each skip increments
``metadata["nonfinite_count"]``. The amounts per algorithm, from their
docstrings:

=================  =======================  =========================
algorithm          NaN in ``train_batch``   NaN in ``val_batch`` only
=================  =======================  =========================
T1T2               2 (inner + outer)        1 (outer)
Greedy (T steps)   T + 1 (every inner step  1 (outer)
                   + outer)
HyperDistill       2 (inner + outer)        1 (outer)
OneShotWarmStart   N (each hyper-step)      N (each hyper-step)
=================  =======================  =========================

(the warm start never changes ``params``; N is ``num_steps``).
"""

import dataclasses
from typing import Any, Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh
from gradhpo.algorithms.greedy import Greedy
from gradhpo.algorithms.online import HyperDistill
from gradhpo.algorithms.t1_t2 import T1T2
from gradhpo.algorithms.warm_start import OneShotWarmStart

HORIZON = 3      # Greedy inner steps per call
LOOKAHEAD = 2    # warm-start lookahead
NUM_STEPS = 2    # warm-start hyper-steps per call
EXAMPLES = 6


def train_loss(w, hp, batch):
    x, y = batch
    return (0.5 * jnp.mean((x @ w - y) ** 2)
            + 0.5 * jnp.exp(hp["log_l2"]) * jnp.sum(w ** 2))


def val_loss(w, hp, batch):
    del hp
    x, y = batch
    return 0.5 * jnp.mean((x @ w - y) ** 2)


def one_batch(i):
    kx, kn = jax.random.split(jax.random.PRNGKey(100 + i))
    x = jax.random.normal(kx, (EXAMPLES, 2))
    y = x @ jnp.array([1.0, -2.0]) + 0.3 * jax.random.normal(kn, (EXAMPLES,))
    return x, y


def stacked(i, n):
    if n is None:
        return one_batch(i)
    return jax.tree.map(lambda *xs: jnp.stack(xs),
                        *[one_batch(i * n + j) for j in range(n)])


@dataclasses.dataclass
class Case:
    make: Callable[[], Any]
    axes: tuple                      # leading step axis of (train, val)
    counts: tuple                    # nonfinite_count: (train NaN, val NaN)
    init_batch: bool = False         # HyperDistill allocates D* from it
    seed: int = 0                    # of the state's PRNG key

    def init(self, opt, seed=None):
        params = jnp.array([0.5, 0.5])
        hp = {"log_l2": jnp.array(-1.0), "n": jnp.array(3, jnp.int32)}
        key = jax.random.PRNGKey(self.seed if seed is None else seed)
        if self.init_batch:
            return opt.init(params, hp, batch=self.batches(0)[0], key=key)
        return opt.init(params, hp, key=key)

    def batches(self, i):
        return stacked(2 * i, self.axes[0]), stacked(2 * i + 1, self.axes[1])


def _inner():
    return optax.sgd(0.1, momentum=0.9)


CASES: Dict[str, Case] = {
    "t1t2": Case(lambda: T1T2(train_loss, val_loss, _inner(),
                              optax.adam(0.1)), (None, None), (2, 1)),
    "t1t2_fd": Case(lambda: T1T2(train_loss, val_loss, _inner(),
                                 optax.adam(0.1),
                                 hypergradient="finite_difference"),
                    (None, None), (2, 1)),
    "greedy": Case(lambda: Greedy(train_loss, val_loss, _inner(),
                                  optax.adam(0.1), horizon=HORIZON,
                                  gamma=0.9, top_k=1,
                                  bounds=(-3.0, 3.0)),
                   (HORIZON, HORIZON), (HORIZON + 1, 1)),
    "hyperdistill": Case(lambda: HyperDistill(train_loss, val_loss, _inner(),
                                              optax.adam(0.1), gamma=0.9),
                         (None, None), (2, 1), init_batch=True, seed=7),
    "warm_start": Case(lambda: OneShotWarmStart(
        train_loss, val_loss, _inner(), optax.adam(0.1),
        lookahead=LOOKAHEAD, num_steps=NUM_STEPS),
        (LOOKAHEAD, None), (NUM_STEPS, NUM_STEPS)),
    "warm_start_random": Case(lambda: OneShotWarmStart(
        train_loss, val_loss, _inner(), step_size=0.1,
        lookahead=LOOKAHEAD, num_steps=NUM_STEPS, direction="random"),
        (LOOKAHEAD, None), (NUM_STEPS, NUM_STEPS), seed=11),
}
NAMES = list(CASES)


@pytest.fixture(scope="module")
def built():
    """One optimizer, its jitted step and a warmed-up state per case
    (compiled once for the module)."""
    cache = {}

    def get(name):
        if name not in cache:
            case = CASES[name]
            opt = case.make()
            step = jax.jit(opt.step)
            # one clean step first, so momenta and the outer state are
            # non-zero and "unchanged" means something
            state = step(case.init(opt), *case.batches(0))
            cache[name] = (case, opt, step, state)
        return cache[name]
    return get


def _leaf_bytes(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(
            x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = np.asarray(x)
    return x.dtype, x.shape, x.tobytes()


def assert_bit_equal(a, b):
    """Same tree, dtypes, shapes and bytes (NaN == NaN, -0.0 != 0.0)."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        assert _leaf_bytes(x) == _leaf_bytes(y)


def _bit_equal(a, b):
    try:
        assert_bit_equal(a, b)
        return True
    except AssertionError:
        return False


def poison(batch):
    """A NaN in the first feature of the first example of every slice."""
    x, y = batch
    return x.at[..., 0, 0].set(jnp.nan), y


FIELDS = ["params", "inner_opt_state", "hyperparams", "outer_opt_state"]


# -- NaN injection -------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_nan_in_train_batch_changes_nothing_and_is_counted(name, built):
    case, opt, step, state = built(name)
    train, val = case.batches(1)
    new = step(state, poison(train), val)
    for field in FIELDS:
        assert_bit_equal(getattr(new, field), getattr(state, field))
    count = int(state.metadata["nonfinite_count"])
    assert int(new.metadata["nonfinite_count"]) == count + case.counts[0]
    assert int(new.step) == int(state.step) + 1
    if name == "hyperdistill":
        # a poisoned batch never enters D*; the episode does not advance
        for key in ["w_star", "d_star", "episode_step"]:
            assert_bit_equal(getattr(new.algorithm_state, key),
                             getattr(state.algorithm_state, key))
    # a later clean step proceeds normally from the kept state
    after = step(new, train, val)
    assert int(after.metadata["nonfinite_count"]) == count + case.counts[0]
    for leaf in jax.tree.leaves((after.params, after.hyperparams)):
        assert np.all(np.isfinite(leaf))


VAL_NAN_CASES = NAMES


@pytest.mark.parametrize("name", VAL_NAN_CASES)
def test_nan_in_val_batch_only_skips_the_outer_update(name, built):
    case, opt, step, state = built(name)
    train, val = case.batches(1)
    clean = step(state, train, val)
    new = step(state, train, poison(val))
    # the outer update is skipped ...
    assert_bit_equal(new.hyperparams, state.hyperparams)
    assert_bit_equal(new.outer_opt_state, state.outer_opt_state)
    count = int(state.metadata["nonfinite_count"])
    assert int(new.metadata["nonfinite_count"]) == count + case.counts[1]
    # ... the inner step is applied exactly as on the clean batch
    assert_bit_equal(new.params, clean.params)
    assert_bit_equal(new.inner_opt_state, clean.inner_opt_state)
    if name.startswith("warm_start"):
        assert_bit_equal(new.params, state.params)   # never changes w
    else:
        assert not _bit_equal(new.params, state.params)
        assert not _bit_equal(clean.hyperparams, state.hyperparams)
    if name == "hyperdistill":
        for key in ["w_star", "d_star", "episode_step"]:
            assert_bit_equal(getattr(new.algorithm_state, key),
                             getattr(clean.algorithm_state, key))


def test_greedy_partly_poisoned_horizon_still_updates(built):
    """Only a fully poisoned horizon skips the outer update."""
    case, opt, step, state = built("greedy")
    train, val = case.batches(1)
    x, y = train
    new = step(state, (x.at[1, 0, 0].set(jnp.nan), y), val)
    assert int(new.metadata["nonfinite_count"]) == int(
        state.metadata["nonfinite_count"]) + 1
    assert not _bit_equal(new.params, state.params)
    assert not _bit_equal(new.outer_opt_state, state.outer_opt_state)


# -- determinism -------------------------------------------------------------

def _run(case, opt, steps=3, seed=None):
    state = case.init(opt, seed)
    for i in range(steps):
        state = opt.step(state, *case.batches(i))
    return state


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_gives_bit_identical_runs(name):
    case = CASES[name]
    first = _run(case, case.make())
    second = _run(case, case.make())
    assert_bit_equal(first, second)
    assert int(first.step) == 3


def test_the_key_is_used():
    """Different keys give different D* (HyperDistill) and different random
    directions (warm start), so the determinism above is not vacuous."""
    base = CASES["hyperdistill"]
    runs = [_run(base, base.make(), seed=s) for s in (7, 8)]
    first, second = runs[0].algorithm_state, runs[1].algorithm_state
    assert not _bit_equal(first.key, second.key)
    assert not _bit_equal(first.d_star, second.d_star)
    warm = CASES["warm_start_random"]
    runs = [_run(warm, warm.make(), steps=1, seed=s) for s in (11, 12)]
    assert not _bit_equal(runs[0].hyperparams, runs[1].hyperparams)


# -- checkpoints -------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_and_resume(name, tmp_path):
    case = CASES[name]
    opt = case.make()
    state = _run(case, opt, steps=2)
    path = tmp_path / f"{name}.npz"
    gh.save_state(path, state)
    # a new process: a new optimizer and a template from its init
    fresh = case.make()
    loaded = gh.load_state(path, like=case.init(fresh))
    assert_bit_equal(loaded, state)
    if name == "hyperdistill":
        assert isinstance(loaded.algorithm_state, gh.HyperDistillState)
        assert int(loaded.algorithm_state.episode_step) == 2
    if name == "warm_start_random":
        assert isinstance(loaded.algorithm_state, gh.OneShotWarmStartState)
    for i in range(2, 4):
        state = opt.step(state, *case.batches(i))
        loaded = fresh.step(loaded, *case.batches(i))
    assert_bit_equal(loaded, state)
