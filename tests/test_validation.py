"""Bad inputs to every algorithm raise early, with the argument's name.

One parametrized table: each row builds an optimizer, a state or a call
from one bad input and asserts the exception type and message. Errors name
the argument as it is spelled in the signature (``hyperparams['l2']``,
``train_batch``, ``gamma``), what was given, and what is allowed. Then the
host-side checks of ``step``: a wrong state, a wrong leading step axis,
HyperDistill's changed batch shape, and that a repeated batch signature
never traces the losses again.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradhpo.algorithms.greedy import Greedy
from gradhpo.algorithms.online import HyperDistill
from gradhpo.algorithms.t1_t2 import T1T2
from gradhpo.algorithms.warm_start import OneShotWarmStart

import problems as pb

TL, VL = pb.ridge_train_loss, pb.ridge_val_loss
W0 = jnp.zeros(2)
LAM = jnp.array(1.0)
NAN = float("nan")
INF = float("inf")


def t1t2(**kw):
    return T1T2(TL, VL, optax.sgd(0.01), optax.sgd(0.1), **kw)


def greedy(**kw):
    return Greedy(TL, VL, optax.sgd(0.01), optax.sgd(0.1), **kw)


def distill(**kw):
    return HyperDistill(TL, VL, optax.sgd(0.01), optax.sgd(0.1), **kw)


def warm(**kw):
    return OneShotWarmStart(TL, VL, optax.sgd(0.01), **kw)


def stack(batch, n):
    return jax.tree.map(lambda x: jnp.stack([x] * n), batch)


def vector_loss(w, lam, batch):
    """A per-example loss vector: a common mistake."""
    x, y = batch
    return 0.5 * (x @ w - y) ** 2 + 0.5 * lam * jnp.sum(w ** 2)


def int_loss(w, lam, batch):
    del lam, batch
    return jnp.sum(w > 0)


def _step(opt, hp=LAM, train=None, val=None, init_kw=None):
    """Runs one step of ``opt`` from ``init(W0, hp)`` on the ridge batches
    (or the given ones)."""
    ridge_train, ridge_val = pb.ridge_batches()
    state = opt.init(W0, hp, **(init_kw or {}))
    return opt.step(state, ridge_train if train is None else train,
                    ridge_val if val is None else val)


def _ridge_stacked(n):
    train, val = pb.ridge_batches()
    return stack(train, n), stack(val, n)


def _lr_inner(hp):
    return optax.sgd(hp["lr"])


# (id, thunk raising, exception type, regex of the message)
BAD_INPUTS = [
    # -- the shared constructor arguments ------------------------------------
    ("t1t2-train_loss-not-callable",
     lambda: T1T2("loss", VL, optax.sgd(0.1), optax.sgd(0.1)), TypeError,
     r"train_loss must be a callable loss\(params, hyperparams, batch\) -> "
     r"scalar, got 'loss' \(type str\)"),
    ("greedy-val_loss-none",
     lambda: Greedy(TL, None, optax.sgd(0.1), optax.sgd(0.1)), TypeError,
     r"val_loss must be a callable .*got None \(type NoneType\)"),
    ("distill-inner_optimizer-float",
     lambda: HyperDistill(TL, VL, 0.1, optax.sgd(0.1)), TypeError,
     r"inner_optimizer must be an optax.GradientTransformation .*or a "
     r"callable hyperparams -> GradientTransformation .*got 0.1 "
     r"\(type float\)"),
    ("t1t2-outer_optimizer-none",
     lambda: T1T2(TL, VL, optax.sgd(0.1), None), TypeError,
     r"outer_optimizer must be an optax.GradientTransformation "
     r"\(e.g. optax.adam\(1e-2\)\), got None"),
    ("warm-outer_optimizer-str",
     lambda: OneShotWarmStart(TL, VL, optax.sgd(0.1), "adam"), TypeError,
     r"outer_optimizer must be .* or None, got 'adam' \(type str\)"),
    # -- T1T2 options ----------------------------------------------------------
    ("t1t2-hypergradient", lambda: t1t2(hypergradient="darts"), ValueError,
     r"hypergradient must be one of 'exact', 'finite_difference'; got "
     r"'darts'"),
    ("t1t2-fd_radius-zero", lambda: t1t2(fd_radius=0.0), ValueError,
     r"fd_radius must be in \(0.0, inf\), got 0.0"),
    ("t1t2-fd_radius-str", lambda: t1t2(fd_radius="0.01"), TypeError,
     r"fd_radius must be a real number, got '0.01' \(type str\)"),
    ("t1t2-fd_radius-inf", lambda: t1t2(fd_radius=INF), ValueError,
     r"fd_radius must be in \(0.0, inf\), got inf"),
    # -- Greedy options --------------------------------------------------------
    ("greedy-horizon-zero", lambda: greedy(horizon=0), ValueError,
     r"horizon must be an int >= 1, got 0"),
    ("greedy-horizon-float", lambda: greedy(horizon=2.0), TypeError,
     r"horizon must be an int, got 2.0 \(type float\)"),
    ("greedy-unroll-zero", lambda: greedy(unroll=0), ValueError,
     r"unroll must be an int >= 1, got 0"),
    ("greedy-unroll-string", lambda: greedy(unroll="all"), TypeError,
     r"unroll must be an int, got 'all'"),
    ("greedy-gamma-above-one", lambda: greedy(gamma=1.5), ValueError,
     r"gamma must be in \[0.0, 1.0\], got 1.5"),
    ("greedy-gamma-nan", lambda: greedy(gamma=NAN), ValueError,
     r"gamma must be in \[0.0, 1.0\], got nan"),
    ("greedy-top_k-zero", lambda: greedy(top_k=0), ValueError,
     r"top_k must be an int >= 1, got 0"),
    ("greedy-top_k-bool", lambda: greedy(top_k=True), TypeError,
     r"top_k must be an int, got True \(type bool\)"),
    ("greedy-score", lambda: greedy(score="abs"), ValueError,
     r"score must be one of 'magnitude', 'predicted_improvement'; got 'abs'"),
    ("greedy-bounds-not-pair", lambda: greedy(bounds=0.0), ValueError,
     r"bounds must be None or a pair \(lower, upper\) .*got 0.0"),
    ("greedy-bounds-str", lambda: greedy(bounds=("a", 1.0)), TypeError,
     r"bounds\[0\] must be None, a real number or a real array, got 'a'"),
    ("greedy-bounds-nan", lambda: greedy(bounds=(0.0, NAN)), ValueError,
     r"bounds\[1\] must not be NaN \(use None or \+-inf for unbounded\)"),
    # -- HyperDistill options --------------------------------------------------
    ("distill-gamma-negative", lambda: distill(gamma=-0.1), ValueError,
     r"gamma must be in \[0.0, 1.0\], got -0.1"),
    ("distill-theta-inf", lambda: distill(theta=INF), ValueError,
     r"theta must be in \(-inf, inf\), got inf"),
    ("distill-key-int", lambda: distill().init(W0, LAM, batch=None, key=3),
     TypeError, r"key must be a single PRNG key, jax.random.key\(seed\) or "
     r"jax.random.PRNGKey\(seed\) .*got 3 \(type int\)"),
    ("distill-key-stack",
     lambda: distill().init(W0, LAM, batch=None, key=jax.random.split(
         jax.random.PRNGKey(0), 3)),
     TypeError, r"key must be a single PRNG key.* of shape \(3, 2\)"),
    ("distill-init-no-batch", lambda: distill().init(W0, LAM), TypeError,
     r"HyperDistill.init needs batch=: a training batch"),
    # -- OneShotWarmStart options ---------------------------------------------
    ("warm-step_size-zero", lambda: warm(step_size=0.0), ValueError,
     r"step_size must be in \(0.0, inf\), got 0.0"),
    ("warm-step_size-negative", lambda: warm(step_size=-1e-3), ValueError,
     r"step_size must be in \(0.0, inf\), got -0.001"),
    ("warm-num_steps-zero", lambda: warm(num_steps=0), ValueError,
     r"num_steps must be an int >= 1, got 0"),
    ("warm-lookahead-zero", lambda: warm(lookahead=0), ValueError,
     r"lookahead must be an int >= 1, got 0"),
    ("warm-direction", lambda: warm(direction="sideways"), ValueError,
     r"direction must be one of 'hypergradient', 'random'; got 'sideways'"),
    ("warm-direction-array", lambda: warm(direction=np.array(["random"])),
     ValueError, r"direction must be one of 'hypergradient', 'random'"),
    ("warm-key-float", lambda: warm().init(W0, LAM, key=jnp.zeros(2)),
     TypeError, r"key must be a single PRNG key"),
    ("t1t2-inner_optimizer-uncalled-factory",
     lambda: T1T2(TL, VL, optax.sgd, optax.sgd(0.1)), TypeError,
     r"inner_optimizer is the optax factory optax.sgd, not a "
     r"transformation: call it with its arguments .*lambda hp: "
     r"optax.sgd\(hp\['lr'\]\)"),
    ("greedy-outer_optimizer-uncalled-factory",
     lambda: Greedy(TL, VL, optax.sgd(0.1), optax.adam), TypeError,
     r"outer_optimizer is the optax factory optax.adam, not a "
     r"transformation"),
    # -- init: params and hyperparams -----------------------------------------
    ("t1t2-params-nan", lambda: t1t2().init(jnp.array([NAN, 0.0]), LAM),
     ValueError, r"params must be finite, got a value containing NaN or inf"),
    ("greedy-hyperparams-inf",
     lambda: greedy().init(W0, {"l2": jnp.array(INF)}), ValueError,
     r"hyperparams\['l2'\] must be finite, got a value containing NaN"),
    ("distill-hyperparams-str", lambda: distill().init(W0, "0.5", batch=None),
     TypeError, r"hyperparams must be a real floating array or number "
     r"\(tuned\) or an integer \(held fixed\), got '0.5' \(type str\)"),
    ("warm-hyperparams-none-leaf",
     lambda: OneShotWarmStart(TL, VL, _lr_inner).init(W0, {"lr": None}),
     TypeError, r"hyperparams\['lr'\] must be a real floating .*got None; "
     r"give it a value or remove the entry"),
    ("t1t2-hyperparams-bool",
     lambda: t1t2().init(W0, {"l2": 0.5, "flag": jnp.array([True])}),
     TypeError, r"hyperparams\['flag'\] must be .*got a boolean; use "
     r"0.0/1.0 to tune it or an int to hold it fixed"),
    ("greedy-hyperparams-complex",
     lambda: greedy().init(W0, jnp.array(1.0 + 1.0j)), TypeError,
     r"hyperparams must be .*got complex dtype complex64; complex values "
     r"are not supported"),
    ("distill-hyperparams-int-only", lambda: distill().init(W0, 3, batch=None),
     ValueError, r"hyperparams must contain at least one floating leaf for "
     r"HyperDistill to tune \(integer leaves are held fixed\), got dtypes "
     r"\['int32'\]; write 1.0, not 1"),
    ("t1t2-params-int", lambda: t1t2().init(jnp.zeros(2, jnp.int32), LAM),
     TypeError, r"params must be a real floating array \(every leaf of "
     r"params is trained by inner_optimizer\), got integer dtype int32"),
    ("warm-params-empty", lambda: warm().init({}, LAM), ValueError,
     r"params must contain at least one array, got an empty pytree"),
    ("t1t2-hyperparams-vs-inner_optimizer",
     lambda: T1T2(TL, VL, _lr_inner, optax.sgd(0.1)).init(
         W0, {"learning_rate": 0.1}), ValueError,
     r"hyperparams do not match what inner_optimizer expects: .*"
     r"KeyError: 'lr'"),
    # -- init: options that must match the hyperparameters -------------------
    ("greedy-bounds-lower-above-upper",
     lambda: greedy(bounds=(1.0, 0.0)).init(W0, LAM), ValueError,
     r"bounds must satisfy lower <= upper on every entry, got \(1.0, 0.0\)"),
    ("greedy-bounds-tree",
     lambda: greedy(bounds=({"a": 0.0}, None)).init(W0, {"l2": 1.0}),
     ValueError, r"bounds\[0\] must be a scalar, None or a pytree shaped "
     r"like hyperparams \(or a prefix of it\)"),
    ("warm-bounds-shape",
     lambda: warm(bounds=(None, {"x": jnp.ones(3)})).init(
         W0, {"x": jnp.ones(2)}), ValueError,
     r"bounds\[1\] has an entry of shape \(3,\) for hyperparams\['x'\] of "
     r"shape \(2,\); it must broadcast"),
    ("greedy-trainable-not-bool",
     lambda: greedy(trainable=1.0).init(W0, LAM), TypeError,
     r"trainable must hold booleans"),
    ("greedy-trainable-shape",
     lambda: greedy(trainable=jnp.array([True, False, True])).init(
         W0, jnp.ones(2)), ValueError,
     r"trainable has an entry of shape \(3,\) for hyperparams of shape "
     r"\(2,\)"),
    ("distill-init-batch-scalar",
     lambda: distill().init(W0, LAM, batch=jnp.array(1.0)), ValueError,
     r"batch must have a leading axis on every leaf, got a scalar leaf"),
    ("distill-init-train_loss-vector",
     lambda: HyperDistill(vector_loss, VL, optax.sgd(0.1),
                          optax.sgd(0.1)).init(
         W0, LAM, batch=pb.ridge_batches()[0]), ValueError,
     r"train_loss must return a floating scalar, got shape \(3,\) and dtype "
     r"float32; reduce the per-example losses"),
    # -- the first step: losses and batches -----------------------------------
    ("t1t2-step-train_loss-vector",
     lambda: _step(T1T2(vector_loss, VL, optax.sgd(0.1), optax.sgd(0.1))),
     ValueError, r"train_loss must return a floating scalar, got shape "
     r"\(3,\)"),
    ("greedy-step-val_loss-int",
     lambda: _step(Greedy(TL, int_loss, optax.sgd(0.1), optax.sgd(0.1))),
     ValueError, r"val_loss must return a floating scalar, got shape \(\) "
     r"and dtype int32"),
    ("warm-step-val_loss-vector",
     lambda: _step(OneShotWarmStart(TL, vector_loss, optax.sgd(0.1))),
     ValueError, r"val_loss must return a floating scalar, got shape "
     r"\(2,\)"),
    ("greedy-step-train_batch-horizon",
     lambda: _step(greedy(horizon=3), train=_ridge_stacked(2)[0],
                   val=_ridge_stacked(3)[1]), ValueError,
     r"train_batch must have a leading axis of length 3 on every leaf \(one "
     r"slice per inner step\), got length 2"),
    ("greedy-step-val_batch-horizon",
     lambda: _step(greedy(horizon=3), train=_ridge_stacked(3)[0],
                   val=_ridge_stacked(4)[1]), ValueError,
     r"val_batch must have a leading axis of length 3 on every leaf"),
    ("warm-step-train_batch-lookahead",
     lambda: _step(warm(lookahead=2), train=_ridge_stacked(3)[0]),
     ValueError, r"train_batch must have a leading axis of length 2 on every "
     r"leaf \(one slice per inner step\), got length 3"),
    ("distill-step-train_batch-shape",
     lambda: _step(distill(), train=jax.tree.map(
         lambda x: x[:2], pb.ridge_batches()[0]),
         init_kw={"batch": pb.ridge_batches()[0]}), ValueError,
     r"train_batch must have the leaf shapes state.algorithm_state.d_star "
     r"was allocated with, \(\(3, 2\), \(3,\)\), got \(\(2, 2\), \(2,\)\)"),
    ("distill-step-train_batch-scalar",
     lambda: _step(distill(), train=jnp.array(1.0),
                   init_kw={"batch": pb.ridge_batches()[0]}), ValueError,
     r"train_batch must have a leading axis on every leaf, got a scalar"),
]


def test_table_is_large_and_ids_are_unique():
    ids = [row[0] for row in BAD_INPUTS]
    assert len(set(ids)) == len(ids) >= 30
    # every algorithm appears
    for prefix in ["t1t2", "greedy", "distill", "warm"]:
        assert sum(i.startswith(prefix + "-") for i in ids) >= 8


@pytest.mark.parametrize("thunk,error,message",
                         [row[1:] for row in BAD_INPUTS],
                         ids=[row[0] for row in BAD_INPUTS])
def test_bad_input_raises_naming_the_argument(thunk, error, message):
    with pytest.raises(error, match=message) as info:
        thunk()
    assert type(info.value) is error     # not a subclass (e.g. KeyError)


# -- inputs that must stay accepted (the checks are not too strict) ----------

def test_integer_leaves_none_subtrees_and_numpy_scalars_are_accepted():
    hp = {"l2": np.float32(0.5), "n": 3}
    state = T1T2(lambda w, h, b: TL(w, h["l2"], b), VL, optax.sgd(0.01),
                 optax.sgd(0.1)).init({"w": W0, "bias": None}, hp)
    assert state.hyperparams["n"].dtype == jnp.int32
    assert state.params["bias"] is None
    greedy(bounds=({"l2": 0.0, "n": None}, None)).init(W0, {"l2": 1.0, "n": 2})
    warm(bounds=(-INF, INF)).init(W0, LAM, key=jax.random.key(2 ** 31))


# -- state and batch checks at step ------------------------------------------

def _ridge_case(name):
    """An optimizer, its state and correctly laid out batches."""
    train, val = pb.ridge_batches()
    if name == "t1t2":
        opt = t1t2()
    elif name == "greedy":
        opt = greedy(horizon=3)
        train, val = stack(train, 3), stack(val, 3)
    elif name == "distill":
        opt = distill()
        return opt, opt.init(W0, LAM, batch=train), train, val
    else:
        opt = warm(lookahead=2)
        train = stack(train, 2)
    return opt, opt.init(W0, LAM), train, val


@pytest.mark.parametrize("name", ["t1t2", "greedy", "distill", "warm"])
def test_wrong_state_type_is_caught(name):
    opt, state, train, val = _ridge_case(name)
    cls = type(opt).__name__
    for method in [opt.step, opt.compute_hypergradient]:
        with pytest.raises(TypeError, match=rf"state must be a gradhpo."
                           rf"BilevelState \(from {cls}.init\), got dict"):
            method({"params": state.params}, train, val)
        with pytest.raises(TypeError, match="got tuple"):
            method(tuple(state.params), train, val)


def test_state_of_another_algorithm_is_caught():
    train, val = pb.ridge_batches()
    other = t1t2().init(W0, LAM)
    with pytest.raises(ValueError, match=r"state.algorithm_state must be a "
                       r"HyperDistillState \(state was not built by "
                       r"HyperDistill.init\), got T1T2State"):
        distill().step(other, train, val)
    with pytest.raises(ValueError, match=r"must be a OneShotWarmStartState"):
        warm().compute_hypergradient(other, train, val)
    with pytest.raises(ValueError, match=r"must be a GreedyState"):
        greedy(top_k=1).step(other, train, val)
    with pytest.raises(ValueError, match=r"must be a HyperDistillState"):
        distill().reset_episode(other, W0)
    plain = greedy().init(W0, LAM)
    with pytest.raises(ValueError, match=r"state was built by a Greedy "
                       r"without top_k; build it with this optimizer's init"):
        greedy(top_k=1).step(plain, train, val)


def test_greedy_horizon_axis_checked_on_every_new_signature():
    opt, state, train, val = _ridge_case("greedy")
    state = opt.step(state, train, val)          # a checked signature
    for bad in [2, 4]:
        with pytest.raises(ValueError, match=rf"train_batch must have a "
                           rf"leading axis of length 3 .*got length {bad}"):
            opt.step(state, jax.tree.map(lambda x, n=bad: x[:1].repeat(
                n, 0), train), val)
    with pytest.raises(ValueError, match="train_batch must have one common "
                       r"leading axis length on every leaf, got lengths "
                       r"\[2, 3\]"):
        opt.step(state, (train[0][:2], train[1]), val)


def test_warm_start_lookahead_axis_and_unstacked_val_batch():
    opt, state, train, val = _ridge_case("warm")
    opt.step(state, train, val)
    with pytest.raises(ValueError, match="train_batch must have a leading "
                       "axis of length 2 on every leaf"):
        opt.step(state, pb.ridge_batches()[0], val)   # the axis forgotten
    with pytest.raises(ValueError, match="train_batch must have a leading "
                       "axis on every leaf, got a scalar leaf"):
        opt.step(state, (jnp.ones(2), jnp.array(1.0)), val)


def test_hyperdistill_changed_batch_shape_is_caught_every_time():
    opt, state, train, val = _ridge_case("distill")
    state = opt.step(state, train, val)
    small = jax.tree.map(lambda x: x[:2], train)
    message = (r"train_batch must have the leaf shapes "
               r"state.algorithm_state.d_star was allocated with, "
               r"\(\(3, 2\), \(3,\)\), got \(\(2, 2\), \(2,\)\)")
    for _ in range(2):     # a failed check is not cached
        with pytest.raises(ValueError, match=message):
            opt.step(state, small, val)
        with pytest.raises(ValueError, match=message):
            opt.compute_hypergradient(state, small, val)
    # the tree, not only the shapes
    with pytest.raises(ValueError, match="train_batch must have the tree "
                       "structure of state.algorithm_state.d_star"):
        opt.step(state, {"x": train[0], "y": train[1]}, val)
    # under a user's jit too (the check runs while tracing)
    with pytest.raises(ValueError, match=message):
        jax.jit(opt.step)(state, small, val)


# -- the checks at step are cached per signature ------------------------------

def _counting(loss, counter):
    def wrapped(w, hp, batch):
        counter.append(1)
        return loss(w, hp, batch)
    return wrapped


@pytest.mark.parametrize("name", ["t1t2", "distill"])
def test_repeated_signature_never_traces_the_losses_again(name):
    traces, val_traces = [], []
    train, val = pb.ridge_batches()
    make = T1T2 if name == "t1t2" else HyperDistill
    opt = make(_counting(TL, traces), _counting(VL, val_traces),
               optax.sgd(0.01), optax.sgd(0.1))
    kw = {"batch": train} if name == "distill" else {}
    state = opt.init(W0, LAM, **kw)
    after_init = len(traces)
    state = opt.step(state, train, val)
    first = (len(traces), len(val_traces))
    assert first[0] > after_init and first[1] > 0
    for _ in range(4):
        state = opt.step(state, train, val)
    assert (len(traces), len(val_traces)) == first
    # compute_hypergradient compiles once; its check hits the cache
    opt.compute_hypergradient(state, train, val)
    second = (len(traces), len(val_traces))
    opt.compute_hypergradient(state, train, val)
    assert (len(traces), len(val_traces)) == second
    if name == "t1t2":
        # a new batch size is checked (and compiled) once, then cached
        short = (train[0][:2], train[1][:2])
        opt.step(state, short, val)
        third = (len(traces), len(val_traces))
        assert third[0] > second[0]
        for batch in [short, train, short]:
            opt.step(state, batch, val)
        assert (len(traces), len(val_traces)) == third


def test_cached_check_still_rejects_a_wrong_state_type():
    opt, state, train, val = _ridge_case("t1t2")
    opt.step(state, train, val)
    with pytest.raises(TypeError, match="state must be a gradhpo"):
        opt.step(state.params, train, val)
