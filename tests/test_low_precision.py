"""bfloat16 hyperparameters: accepted by ``init``, kept through ``step``.

The validation of ``init`` classifies dtypes with :func:`jnp.issubdtype`,
which also knows the ml_dtypes floats (``bfloat16``), so a bfloat16
hyperparameter pytree is tuned like a float32 one: the state keeps its
dtype (and that of the outer optimizer's moments), the hypergradient is
computed by autodiff in it (float32 where the loss promotes, as in
``exp(rho) * w`` with float32 weights) and cast to it on the update, and
the metadata stay float32. Hypergradients are checked in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh


def _losses():
    def val_loss(w, rho, batch):
        x, y = batch
        return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=-1))

    def train_loss(w, rho, batch):
        if isinstance(rho, dict):   # {"rho": ..., "depth": int, fixed}
            rho = rho["rho"]
        lam = jnp.exp(rho)
        return val_loss(w, rho, batch) + 0.5 * jnp.sum(lam * w ** 2)
    return train_loss, val_loss


def _data(dtype=jnp.float32):
    k = jax.random.split(jax.random.PRNGKey(3), 5)
    w = jax.random.normal(k[0], (6, 4), dtype) * 0.5
    train = (jax.random.normal(k[1], (8, 6), dtype),
             jax.random.normal(k[2], (8, 4), dtype))
    val = (jax.random.normal(k[3], (8, 6), dtype),
           jax.random.normal(k[4], (8, 4), dtype))
    rho = jnp.linspace(-1.0, 0.5, 24).reshape(6, 4)
    return w, rho, train, val


def _optimizers(outer):
    train_loss, val_loss = _losses()
    return {
        "t1t2": gh.T1T2(train_loss, val_loss, optax.sgd(0.05), outer),
        "greedy": gh.Greedy(train_loss, val_loss, optax.sgd(0.05), outer),
        "hyperdistill": gh.HyperDistill(train_loss, val_loss,
                                        optax.sgd(0.05), outer),
    }


@pytest.mark.parametrize("name", ["t1t2", "greedy", "hyperdistill"])
@pytest.mark.parametrize("outer", ["sgd", "adam"])
def test_bfloat16_hyperparams_keep_their_dtype(name, outer):
    tx = optax.sgd(0.5) if outer == "sgd" else optax.adam(0.1)
    opt = _optimizers(tx)[name]
    w, rho, train, val = _data()
    rho = rho.astype(jnp.bfloat16)
    kw = {"batch": train} if name == "hyperdistill" else {}
    state = opt.init(w, {"rho": rho, "depth": 3}, **kw)
    assert state.hyperparams["rho"].dtype == jnp.bfloat16
    assert state.hyperparams["depth"].dtype == jnp.int32
    step = jax.jit(opt.step)
    new = step(state, train, val)
    new = step(new, train, val)   # no retrace on the second call
    assert new.hyperparams["rho"].dtype == jnp.bfloat16
    assert new.params.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
        assert a.dtype == b.dtype and a.shape == b.shape
    if outer == "adam":   # the moments take the hyperparameters' dtype
        moments = [x for x in jax.tree.leaves(new.outer_opt_state)
                   if x.ndim == 2]
        assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    for key in ("val_loss", "train_loss", "hypergradient_norm"):
        assert new.metadata[key].dtype == jnp.float32
        assert np.isfinite(float(new.metadata[key]))
    assert int(new.metadata["nonfinite_count"]) == 0
    assert not np.array_equal(np.asarray(new.hyperparams["rho"], float),
                              np.asarray(rho, float))


def test_bfloat16_hypergradient_matches_float64(x64):
    """The bfloat16 hypergradient is the float64 one at the same (bf16
    representable) point, to bfloat16 precision; the update is the float64
    update cast to bfloat16."""
    w, rho, train, val = _data(jnp.float64)
    rho16 = rho.astype(jnp.bfloat16)
    rho64 = rho16.astype(jnp.float64)
    opt = _optimizers(optax.sgd(2.0))["t1t2"]
    h64 = opt.compute_hypergradient(opt.init(w, rho64), train, val)
    # float32 weights and batches, as in the benchmark
    w32, train32, val32 = jax.tree.map(
        lambda x: x.astype(jnp.float32), (w, train, val))
    state16 = opt.init(w32, rho16)
    h16 = opt.compute_hypergradient(state16, train32, val32)
    assert h64.dtype == jnp.float64 and h16.dtype == jnp.bfloat16
    h64, h16n = np.asarray(h64), np.asarray(h16, np.float64)
    scale = np.max(np.abs(h64))
    assert scale > 1e-4
    # 8 significant bits, plus float32 arithmetic in between
    np.testing.assert_allclose(h16n, h64, rtol=2 ** -7,
                               atol=2 ** -8 * scale)
    new = opt.step(state16, train32, val32)
    expected = (rho16.astype(jnp.float32)
                - 2.0 * h16.astype(jnp.float32)).astype(jnp.bfloat16)
    # the outer update in bfloat16: at most one bf16 ulp from the
    # float32 update rounded once
    got = np.asarray(new.hyperparams, np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(got))) - 7)
    assert np.all(np.abs(got - np.asarray(expected, np.float64))
                  <= ulp)


def test_bfloat16_small_updates_are_lost():
    """An update below half a bfloat16 spacing leaves the hyperparameter
    unchanged (what the benchmark's comparison shows for Adam at 1e-2 on
    rho = log(1e-4) = -9.2, where the spacing is 0.0625)."""
    train_loss, val_loss = _losses()
    w, rho, train, val = _data()
    rho = jnp.full((6, 4), np.log(1e-4), jnp.bfloat16)
    opt = gh.T1T2(train_loss, val_loss, optax.sgd(0.05), optax.adam(1e-2))
    s16 = opt.init(w, rho)
    s32 = opt.init(w, rho.astype(jnp.float32))
    for _ in range(3):
        s16 = opt.step(s16, train, val)
        s32 = opt.step(s32, train, val)
    np.testing.assert_array_equal(np.asarray(s16.hyperparams),
                                  np.asarray(rho))
    moved = np.abs(np.asarray(s32.hyperparams) - np.asarray(rho, float))
    assert np.mean(moved > 0) > 0.9 and np.all(moved < 0.031)


def test_float32_unchanged_and_bad_leaves_still_rejected():
    train_loss, val_loss = _losses()
    w, rho, train, val = _data()
    opt = gh.T1T2(train_loss, val_loss, optax.sgd(0.05), optax.adam(0.1))
    state = opt.init(w, rho)
    assert state.hyperparams.dtype == jnp.float32
    with pytest.raises(ValueError, match="finite"):
        opt.init(w, rho.astype(jnp.bfloat16).at[0, 0].set(jnp.nan))
    with pytest.raises(TypeError, match="boolean"):
        opt.init(w, {"a": rho, "flag": True})
    with pytest.raises(TypeError, match="complex"):
        opt.init(w, rho.astype(jnp.complex64))
    with pytest.raises(TypeError, match="integer"):
        opt.init(jnp.ones(3, jnp.int32), rho)
    # bfloat16 parameters pass the same check
    s = opt.init(w.astype(jnp.bfloat16), rho)
    assert s.params.dtype == jnp.bfloat16
