"""Property tests over random pytrees of hyperparameters and parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from hypothesis import given, settings, strategies as st

import gradhpo as gh

SHAPES = st.sampled_from([(), (0,), (1,), (3,), (2, 2)])


def _trees(leaf):
    return st.recursive(
        leaf,
        lambda children: st.one_of(
            st.lists(children, min_size=1, max_size=3),
            st.dictionaries(st.sampled_from("abcd"), children, min_size=1,
                            max_size=3)),
        max_leaves=5)


@st.composite
def problems(draw):
    hp_shapes = draw(_trees(SHAPES))
    w_shapes = draw(_trees(SHAPES))
    seed = draw(st.integers(0, 2 ** 16))
    return hp_shapes, w_shapes, seed


def _build(hp_shapes, w_shapes, seed):
    """Random arrays with the drawn structures, and a loss coupling every
    hyperparameter leaf to every parameter leaf (so every coordinate of the
    hypergradient is non-trivial), with a direct term in the validation
    loss."""
    rng = np.random.default_rng(seed)
    is_shape = (lambda x: isinstance(x, tuple)
                and all(isinstance(d, int) for d in x))
    hp = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-1, 1, s)),
                      hp_shapes, is_leaf=is_shape)
    w = jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s)), w_shapes,
                     is_leaf=is_shape)
    target = jax.tree.map(lambda x: x + 0.5, w)

    def coupling(hp):
        return sum(jnp.sum(jnp.tanh(x) * (1.0 + jnp.arange(x.size).reshape(
            x.shape))) for x in jax.tree.leaves(hp))

    def train_loss(w, hp, batch):
        del batch
        sq = sum(jnp.sum((a - b) ** 2) for a, b in zip(
            jax.tree.leaves(w), jax.tree.leaves(target)))
        quart = sum(jnp.sum(a ** 4) for a in jax.tree.leaves(w))
        return 0.5 * sq + 0.1 * (1.5 + jnp.sin(coupling(hp))) * quart

    def val_loss(w, hp, batch):
        del batch
        return (sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(w))
                + 0.05 * sum(jnp.sum(x ** 2) for x in jax.tree.leaves(hp)))
    return w, hp, train_loss, val_loss


@settings(max_examples=8, deadline=None)
@given(problems())
def test_exact_hypergradient_structure_and_central_difference(problem):
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        w, hp, train_loss, val_loss = _build(*problem)
        tx = optax.sgd(0.1, momentum=0.5)
        opt = gh.T1T2(train_loss, val_loss, tx, optax.sgd(0.1))
        state = opt.init(w, hp)
        h = opt.compute_hypergradient(state, None, None)
        assert jax.tree.structure(h) == jax.tree.structure(state.hyperparams)
        for a, b in zip(jax.tree.leaves(h), jax.tree.leaves(hp)):
            assert a.shape == b.shape and a.dtype == b.dtype
        flat, unravel = jax.flatten_util.ravel_pytree(state.hyperparams)

        def objective(f):
            lam = unravel(f)
            g = jax.grad(train_loss)(state.params, lam, None)
            u, _ = tx.update(g, state.inner_opt_state, state.params)
            return val_loss(optax.apply_updates(state.params, u), lam, None)
        delta = 1e-6
        fd = np.array([(objective(flat.at[i].add(delta))
                        - objective(flat.at[i].add(-delta))) / (2 * delta)
                       for i in range(flat.size)])
        np.testing.assert_allclose(jax.flatten_util.ravel_pytree(h)[0], fd,
                                   rtol=1e-6, atol=1e-8)
        new = opt.step(state, None, None)
        assert jax.tree.structure(new) == jax.tree.structure(state)
        assert np.all(np.isfinite(jax.flatten_util.ravel_pytree(
            new.hyperparams)[0]))
    finally:
        jax.config.update("jax_enable_x64", previous)
