"""Optimizers behave like values: immutable, compiled code shared by equal
configurations and freed with the last of them, keyword calls, typed states
that can start a ``lax.scan``, keys per population member, and a package
that loads no data code and has no import cycles."""

import ast
import functools
import gc
import pathlib
import subprocess
import sys
import weakref

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh
from gradhpo.core import base

import problems as pb

PACKAGE = pathlib.Path(gh.__file__).resolve().parent
TL, VL = pb.ridge_train_loss, pb.ridge_val_loss
W0 = jnp.array([0.2, -0.1])
LAM = jnp.array(0.5)


def stack(batch, n):
    return jax.tree.map(lambda x: jnp.stack([x] * n), batch)


# One entry per algorithm: a builder and the batches one call takes.
def _t1t2(tl=TL, vl=VL):
    return gh.T1T2(tl, vl, optax.sgd(0.05, momentum=0.9), optax.adam(0.05))


def _greedy(tl=TL, vl=VL):
    return gh.Greedy(tl, vl, optax.sgd(0.05), optax.adam(0.05), horizon=3,
                     gamma=0.9, top_k=1, bounds=(0.0, 2.0))


def _distill(tl=TL, vl=VL):
    return gh.HyperDistill(tl, vl, optax.sgd(0.05), optax.adam(0.05),
                           gamma=0.9)


def _warm(tl=TL, vl=VL):
    return gh.OneShotWarmStart(tl, vl, optax.sgd(0.05), step_size=0.1,
                               lookahead=2, direction="random")


BUILDERS = {"t1t2": _t1t2, "greedy": _greedy, "hyperdistill": _distill,
            "warm_start": _warm}
STEPS = {"t1t2": (None, None), "greedy": (3, 3), "hyperdistill": (None, None),
         "warm_start": (2, None)}


def batches(name, i):
    """The i-th (train, val) batches of a call, with the leading step axes
    the algorithm expects."""
    key = jax.random.PRNGKey(i)
    x = jax.random.normal(key, (3, 2))
    y = x @ jnp.array([1.0, -2.0]) + 0.1 * jax.random.normal(
        jax.random.fold_in(key, 1), (3,))
    train, val = (x, y), (x[::-1], y[::-1])
    n_train, n_val = STEPS[name]
    return (train if n_train is None else stack(train, n_train),
            val if n_val is None else stack(val, n_val))


def init(name, opt, key=None):
    if name == "hyperdistill":
        return opt.init(W0, LAM, batch=batches(name, 0)[0], key=key)
    return opt.init(W0, LAM, key=key)


# -- immutable values ---------------------------------------------------------

@pytest.mark.parametrize("name", list(BUILDERS))
def test_setting_an_attribute_raises_and_says_what_to_do(name):
    opt = BUILDERS[name]()
    for attr in ["train_loss", "inner_optimizer", "new_option"]:
        with pytest.raises(AttributeError, match=rf"{type(opt).__name__} is "
                           rf"immutable: cannot set '{attr}' after "
                           r"construction .*Build a new optimizer"):
            setattr(opt, attr, None)
    with pytest.raises(AttributeError, match="immutable: cannot delete"):
        del opt.val_loss
    assert opt.train_loss is TL


def test_stale_configuration_cannot_happen_greedy_gamma(x64):
    """The issue's example: after a first call, ``opt.gamma = 0.0`` used to
    be ignored silently (0.709 instead of 0.258); now it raises, and a new
    optimizer with gamma = 0 gives its own hypergradient."""
    g_train = jnp.array([1.0, 0.5])

    def train_loss(w, alpha, batch):
        return 0.5 * jnp.sum(g_train * (w - alpha) ** 2)

    def val_loss(w, alpha, batch):
        return jnp.sum(w ** 2) + 10 * jnp.sum(jnp.sin(w) ** 2)

    def make(gamma):
        return gh.Greedy(train_loss, val_loss, optax.sgd(0.1),
                         optax.sgd(0.1), horizon=5, gamma=gamma)
    opt = make(0.9)
    state = opt.init(jnp.array([2.0, 2.0]), jnp.array([1.0, 1.0]))
    data = jnp.zeros(5)
    h9 = opt.compute_hypergradient(state, data, data)
    with pytest.raises(AttributeError, match="immutable"):
        opt.gamma = 0.0
    assert opt.gamma == 0.9
    h0 = make(0.0).compute_hypergradient(state, data, data)
    # gamma = 0 is T1-T2 at the last step of the horizon: an independent
    # computation by hand (four plain steps, then one VJP)
    w = jnp.array([2.0, 2.0])
    for _ in range(4):
        w = w - 0.1 * g_train * (w - 1.0)
    _, pull = jax.vjp(lambda a: w - 0.1 * g_train * (w - a),
                      jnp.array([1.0, 1.0]))
    w5 = w - 0.1 * g_train * (w - 1.0)
    expected = pull(jax.grad(lambda v: val_loss(v, None, None))(w5))[0]
    np.testing.assert_allclose(h0, expected, rtol=1e-12)
    assert not np.allclose(h0, h9, rtol=1e-3)


# -- compiled code: shared by equal configurations, freed with them -----------

def _counting(loss, counter):
    def wrapped(w, hp, batch):
        counter.append(1)
        return loss(w, hp, batch)
    return wrapped


@pytest.mark.parametrize("name", list(BUILDERS))
def test_equal_configurations_share_compiled_code(name):
    traces = []
    tl = _counting(TL, traces)
    first = BUILDERS[name](tl)
    state = init(name, first)
    train, val = batches(name, 1)
    first.step(state, train, val)
    traced = len(traces)
    assert traced > 0
    # the same loss functions and optax objects: an equal value
    second = type(first)(first.train_loss, first.val_loss,
                         first.inner_optimizer, first.outer_optimizer,
                         **{k: v for k, v in vars(first).items()
                            if not k.startswith("_") and k not in (
                                "train_loss", "val_loss", "inner_optimizer",
                                "outer_optimizer")})
    assert second == first and hash(second) == hash(first)
    assert second is not first
    chex.assert_trees_all_equal(second.step(state, train, val),
                                first.step(state, train, val))
    assert len(traces) == traced      # not traced (nor compiled) again
    # a new optax object is a new configuration (JAX cannot compare
    # closures): it compiles once more
    third = BUILDERS[name](tl)
    assert third != first
    third.step(state, train, val)
    assert len(traces) > traced


@pytest.mark.parametrize("name", list(BUILDERS))
def test_deleted_optimizers_free_what_their_losses_close_over(name):
    """The issue measured 5 of 5 deleted optimizers alive after
    gc.collect(), each holding a 4 MB array its loss closed over."""
    refs = []
    for i in range(5):
        big = jnp.full((1_000_000,), float(i))

        def train_loss(w, lam, batch, big=big):
            return TL(w, lam, batch) + 0.0 * big[0] * jnp.sum(w)
        opt = BUILDERS[name](train_loss)
        state = init(name, opt)
        state = opt.step(state, *batches(name, 1))
        opt.compute_hypergradient(state, *batches(name, 2))
        refs.append((weakref.ref(opt), weakref.ref(big),
                     weakref.ref(opt._compiled)))
        del opt, big, train_loss, state
    gc.collect()
    alive = [[r() is not None for r in triple] for triple in refs]
    assert not any(any(a) for a in alive), alive


def test_an_optuna_style_loop_does_not_grow_the_registry():
    before = len(base._REGISTRY)
    for i in range(20):
        opt = gh.T1T2(lambda w, lam, b, i=i: TL(w, lam, b) + 0 * i, VL,
                      optax.sgd(0.1), optax.sgd(0.1))
        opt.step(opt.init(W0, LAM), *pb.ridge_batches())
        del opt
    gc.collect()
    assert len(base._REGISTRY) <= before


@pytest.mark.parametrize("name", list(BUILDERS))
def test_keyword_and_positional_calls_agree(name):
    opt = BUILDERS[name]()
    state = init(name, opt)
    train, val = batches(name, 1)
    by_position = opt.step(state, train, val)
    chex.assert_trees_all_equal(
        opt.step(state, train_batch=train, val_batch=val), by_position)
    chex.assert_trees_all_equal(
        opt.step(state=state, val_batch=val, train_batch=train),
        by_position)
    chex.assert_trees_all_equal(
        opt.compute_hypergradient(state, val_batch=val, train_batch=train),
        opt.compute_hypergradient(state, train, val))
    with pytest.raises(TypeError, match="missing a required argument"):
        opt.step(state, train_batch=train)


# -- the inner optimizer ------------------------------------------------------

@pytest.mark.parametrize("factory,name", [
    (optax.sgd, "optax.sgd"), (optax.adam, "optax.adam"),
    (functools.partial(optax.sgd, momentum=0.9), "optax.sgd"),
    (optax.inject_hyperparams(optax.sgd), "optax.sgd")])
def test_uncalled_optax_factory_is_rejected(factory, name):
    for make in [gh.T1T2, gh.Greedy, gh.HyperDistill]:
        with pytest.raises(TypeError, match=rf"inner_optimizer is the optax "
                           rf"factory {name}, not a transformation: call it "
                           r".*or, to tune them as hyperparameters, wrap it: "
                           rf"lambda hp: {name}\(hp\['lr'\]\)"):
            make(TL, VL, factory, optax.sgd(0.1))
    with pytest.raises(TypeError, match="inner_optimizer is the optax"):
        gh.OneShotWarmStart(TL, VL, factory)


def test_a_callable_must_return_a_transformation():
    opt = gh.T1T2(TL, VL, lambda hp: hp, optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"inner_optimizer\(hyperparams\) "
                       r"must return an optax.GradientTransformation"):
        opt.init(W0, LAM)


# -- typed states -------------------------------------------------------------

@pytest.mark.parametrize("name", list(BUILDERS))
def test_lax_scan_over_step_from_init(name):
    """The state's tree, shapes and dtypes never change: a scan can start
    from init, and it equals the Python loop."""
    opt = BUILDERS[name]()
    state = init(name, opt)
    data = [batches(name, i) for i in range(4)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *data)

    def body(s, batch):
        return opt.step(s, *batch), s.metadata["val_loss"]
    scanned, _ = jax.lax.scan(body, state, stacked)
    looped = state
    for batch in data:
        looped = opt.step(looped, *batch)
    chex.assert_trees_all_close(scanned, looped, rtol=1e-5, atol=1e-7)
    assert isinstance(scanned.algorithm_state, opt.state_type)
    assert int(scanned.step) == 4


def test_diagnostics_are_shaped_like_the_hyperparameters():
    hp = {"a": jnp.array([0.5, 0.5]), "b": jnp.array(0.5),
          "n": jnp.array(3, jnp.int32)}

    def val_loss(w, lam, batch):
        return jnp.dot(jnp.array([3.0, -0.1]), lam["a"]) + 2.0 * lam["b"]
    greedy = gh.Greedy(lambda w, lam, b: jnp.sum(w ** 2), val_loss,
                       optax.sgd(0.1), optax.sgd(0.1), top_k=2)
    state = greedy.step(greedy.init(W0, hp), None, None)
    chex.assert_trees_all_equal(
        state.algorithm_state.selected,
        {"a": jnp.array([True, False]), "b": jnp.array(True),
         "n": jnp.array(False)})
    assert int(state.metadata["selected"]) == 2

    warm = gh.OneShotWarmStart(lambda w, lam, b: jnp.sum(w ** 2), val_loss,
                               optax.sgd(0.1), step_size=0.1)
    own = warm.step(warm.init(W0, hp), None, None).algorithm_state
    chex.assert_trees_all_close(
        own.hypergradient, {"a": jnp.array([3.0, -0.1]),
                            "b": jnp.array(2.0), "n": jnp.array(0)})
    chex.assert_trees_all_close(
        own.delta, {"a": jnp.array([-0.3, 0.01]), "b": jnp.array(-0.2),
                    "n": jnp.array(0)}, rtol=1e-6)


@pytest.mark.parametrize("name", ["hyperdistill", "warm_start"])
def test_population_members_get_distinct_keys(name):
    opt = BUILDERS[name]()
    kwargs = ({"batch": batches(name, 0)[0]} if name == "hyperdistill"
              else {})
    settings = [LAM, LAM, LAM]      # the same hyperparameters three times
    states = gh.init_population(opt, W0, settings,
                                key=jax.random.PRNGKey(5), **kwargs)
    keys = np.asarray(states.algorithm_state.key)
    assert len({k.tobytes() for k in keys}) == 3
    np.testing.assert_array_equal(
        keys, np.asarray(jax.random.split(jax.random.PRNGKey(5), 3)))
    states = jax.vmap(opt.step, in_axes=(0, None, None))(
        states, *batches(name, 1))
    if name == "hyperdistill":   # the members subsample D* differently
        train = batches(name, 2)
        states = jax.vmap(opt.step, in_axes=(0, None, None))(states, *train)
        d_star = np.asarray(states.algorithm_state.d_star[0])
        assert not np.array_equal(d_star[0], d_star[1])
    else:   # random directions differ (a scalar: two signs)
        lam = np.asarray(states.hyperparams)
        assert len(set(lam.tolist())) == 2
    # a stack of keys is used as given
    given = jax.random.split(jax.random.PRNGKey(9), 3)
    again = gh.init_population(opt, W0, settings, key=given, **kwargs)
    np.testing.assert_array_equal(again.algorithm_state.key, given)
    with pytest.raises(ValueError, match="key must be one PRNG key or a "
                       "stack of 3 keys"):
        gh.init_population(opt, W0, settings, key=given[:2], **kwargs)
    with pytest.raises(TypeError, match="hyperparams must be a list or "
                       "tuple"):
        gh.init_population(opt, W0, {"l2": LAM}, **kwargs)


def test_typed_keys_work_too():
    opt = _distill()
    train, val = batches("hyperdistill", 1)
    raw = opt.init(W0, LAM, batch=train, key=jax.random.PRNGKey(2))
    typed = opt.init(W0, LAM, batch=train, key=jax.random.key(2))
    chex.assert_trees_all_equal(
        opt.step(raw, train, val).params, opt.step(typed, train, val).params)


# -- the package boundary -----------------------------------------------------

def test_import_gradhpo_loads_nothing_beyond_its_dependencies():
    code = ("import sys\n"
            "import chex, jax, jax.numpy, numpy, optax\n"
            "before = set(sys.modules)\n"
            "import gradhpo\n"
            "print(sorted(m for m in set(sys.modules) - before\n"
            "             if not m.startswith('gradhpo')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip() == "[]"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix(
            "").parts).removesuffix(".__init__")
        yield name, ast.parse(path.read_text()), path.read_text()


def test_package_reads_no_data_and_cites_no_outside_files():
    for name, tree, text in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            for imported in names:
                assert imported.split(".")[0] not in (
                    "tarfile", "urllib", "pickle", "gzip", "requests"), (
                    f"{name} imports {imported}")
        for outside in ["ALGORITHMS.md", "DESIGN.md", "../shared",
                        "shared/data"]:
            assert outside not in text, f"{name} refers to {outside}"


def test_no_import_cycles_and_no_private_imports():
    edges = {}
    for name, tree, _ in _modules():
        parts = name.split(".")
        sub = parts[1] if len(parts) > 2 else name
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or not (
                    node.module or "").startswith("gradhpo"):
                continue
            for alias in node.names:
                assert not alias.name.startswith("_"), (
                    f"{name} imports the private {node.module}.{alias.name}")
            target = node.module.split(".")
            if name == "gradhpo" or len(target) < 2:
                continue
            if target[1] != sub and len(parts) > 2:
                edges.setdefault(sub, set()).add(target[1])
    # a subpackage graph without cycles: utils <- core <- algorithms <-
    # integrations
    seen, done = set(), set()

    def visit(node, path):
        assert node not in path, f"import cycle: {path + [node]}"
        if node in done:
            return
        for nxt in edges.get(node, ()):
            visit(nxt, path + [node])
        done.add(node)
    for node in list(edges):
        visit(node, [])
    assert "core" not in edges.get("utils", set())
    del seen


# -- cost accounting ----------------------------------------------------------

def _evals(opt, train, val, init_kwargs=None, calls=3):
    state = opt.init(W0, LAM, **(init_kwargs or {}))
    for _ in range(calls):
        state = opt.step(state, train, val)
    return float(state.metadata["grad_evals"])


def test_grad_evals_are_counted_by_the_library():
    """1 per training gradient, validation batches by size (here 2 of 3
    examples), 2 per second-order product; every call counts, skipped or
    not."""
    train, val = pb.ridge_batches()          # 3 training, 2 validation
    r = 2 / 3
    cases = [
        (gh.T1T2(TL, VL, optax.sgd(0.1), optax.sgd(0.1)), 3 + r),
        (gh.T1T2(TL, VL, optax.sgd(0.1), optax.sgd(0.1),
                 hypergradient="finite_difference"), 3 + r),
        (gh.HyperDistill(TL, VL, optax.sgd(0.1), optax.sgd(0.1)), 4 + r),
        (gh.ForwardMode(TL, VL, optax.sgd(0.1), optax.sgd(0.1)),
         1 + 2 * 1 + r),
        (gh.Implicit(TL, VL, optax.sgd(0.1), optax.sgd(0.1), solver="cg",
                     terms=4), 1 + r + 2 * (4 + 1 + 1)),
        (gh.Implicit(TL, VL, optax.sgd(0.1), optax.sgd(0.1),
                     solver="neumann", neumann_scale=0.1, terms=4),
         1 + r + 2 * (3 + 1)),
    ]
    for opt, per_call in cases:
        kwargs = ({"batch": train} if isinstance(opt, gh.HyperDistill)
                  else {})
        np.testing.assert_allclose(_evals(opt, train, val, kwargs),
                                   3 * per_call, rtol=1e-6,
                                   err_msg=type(opt).__name__)
    # several inner steps per call
    greedy = gh.Greedy(TL, VL, optax.sgd(0.1), optax.sgd(0.1), horizon=4)
    np.testing.assert_allclose(
        _evals(greedy, stack(train, 4), stack(val, 4)), 3 * 4 * (3 + r),
        rtol=1e-6)
    warm = gh.OneShotWarmStart(TL, VL, optax.sgd(0.1), lookahead=2,
                               num_steps=3)
    np.testing.assert_allclose(_evals(warm, stack(train, 2), val),
                               3 * 3 * (2 * 3 + r), rtol=1e-6)
    # an update every 3rd call: the solve is charged on those calls only
    sparse = gh.Implicit(TL, VL, optax.sgd(0.1), optax.sgd(0.1),
                         solver="cg", terms=4, hyper_interval=3)
    np.testing.assert_allclose(_evals(sparse, train, val, calls=6),
                               6 * 1 + 2 * (r + 2 * 6), rtol=1e-6)
    # skipped steps are still paid for
    bad = (train[0].at[0, 0].set(jnp.nan), train[1])
    t1t2 = gh.T1T2(TL, VL, optax.sgd(0.1), optax.sgd(0.1))
    np.testing.assert_allclose(_evals(t1t2, bad, val), 3 * (3 + r),
                               rtol=1e-6)


def test_estimate_theta_is_counted():
    train, val = pb.ridge_batches()
    opt = gh.HyperDistill(TL, VL, optax.sgd(0.1), optax.sgd(0.1))
    state = opt.init(W0, LAM, batch=train)
    fitted = opt.estimate_theta(state, stack(train, 5), val)
    np.testing.assert_allclose(float(fitted.metadata["grad_evals"]),
                               5 * 7 + 2 / 3, rtol=1e-6)
