"""Atomic checkpoints: bit-exact round trips, clear errors, crash safety."""

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh
from gradhpo.utils import checkpoint

import problems as pb


def _trained_state(steps=3, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    opt = gh.T1T2(pb.mlp_train_loss, pb.mlp_val_loss, optax.adam(1e-2),
                  optax.adam(1e-2))
    state = opt.init(pb.init_mlp(k1), pb.mlp_hyperparams())
    for _ in range(steps):
        state = opt.step(state, pb.mlp_batch(k2), pb.mlp_batch(k3))
    return opt, state


def test_round_trip_is_bit_exact(tmp_path):
    _, state = _trained_state()
    state = state.replace(algorithm_state={
        "key": jax.random.PRNGKey(3), "typed_key": jax.random.key(4),
        "half": jnp.arange(3, dtype=jnp.bfloat16)})
    path = tmp_path / "ckpt.npz"
    gh.save_state(path, state)
    restored = gh.load_state(path, like=state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
        if jnp.issubdtype(b.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert a.dtype == b.dtype
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    # a restored typed key draws the same numbers
    np.testing.assert_array_equal(
        jax.random.normal(restored.algorithm_state["typed_key"], (3,)),
        jax.random.normal(state.algorithm_state["typed_key"], (3,)))


def test_continuing_from_a_checkpoint_matches_an_uninterrupted_run(tmp_path):
    opt, state = _trained_state(steps=2)
    k2, k3 = jax.random.split(jax.random.PRNGKey(9))
    path = tmp_path / "ckpt.npz"
    gh.save_state(path, state)
    restored = gh.load_state(path, like=opt.init(
        pb.init_mlp(jax.random.PRNGKey(5)), pb.mlp_hyperparams()))
    a, b = state, restored
    for _ in range(3):
        a = opt.step(a, pb.mlp_batch(k2), pb.mlp_batch(k3))
        b = opt.step(b, pb.mlp_batch(k2), pb.mlp_batch(k3))
    chex.assert_trees_all_equal(a, b)


def test_same_seed_gives_bit_identical_states():
    chex.assert_trees_all_equal(_trained_state(seed=1)[1],
                                _trained_state(seed=1)[1])


def test_mismatched_template_is_a_clear_error(tmp_path):
    _, state = _trained_state(steps=0)
    path = tmp_path / "ckpt.npz"
    gh.save_state(path, state)
    other = state.replace(params=state.params[:1])
    with pytest.raises(ValueError, match="does not match `like`"):
        gh.load_state(path, like=other)
    reshaped = state.replace(hyperparams={
        "log_l2": [jnp.zeros(2), jnp.zeros(())],
        "smooth_logit": jnp.zeros(())})
    with pytest.raises(ValueError, match=r"saved with shape \(\) .* `like` "
                       r"has .* shape \(2,\)"):
        gh.load_state(path, like=reshaped)
    retyped = state.replace(step=jnp.zeros((), jnp.int16))
    with pytest.raises(ValueError, match="dtype int32"):
        gh.load_state(path, like=retyped)


def test_bad_files_are_clear_errors(tmp_path):
    _, state = _trained_state(steps=0)
    with pytest.raises(FileNotFoundError):
        gh.load_state(tmp_path / "missing.npz", like=state)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable gradhpo checkpoint"):
        gh.load_state(junk, like=state)


def test_other_format_version_is_refused(tmp_path, monkeypatch):
    _, state = _trained_state(steps=0)
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 99)
    gh.save_state(tmp_path / "v99.npz", state)
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", 1)
    with pytest.raises(ValueError, match="format version 99"):
        gh.load_state(tmp_path / "v99.npz", like=state)


def test_crash_before_rename_keeps_the_previous_checkpoint(tmp_path,
                                                           monkeypatch):
    _, old = _trained_state(steps=1)
    _, new = _trained_state(steps=2)
    path = tmp_path / "ckpt.npz"
    gh.save_state(path, old)

    def crash(src, dst):
        assert os.path.getsize(src) > 0      # the temporary file was written
        raise KeyboardInterrupt("killed between write and rename")
    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        gh.save_state(path, new)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]   # no temp left
    chex.assert_trees_all_equal(gh.load_state(path, like=old), old)


def test_format_one_files_are_refused_with_a_reason(tmp_path):
    """Checkpoints of gradhpo 0.1 kept algorithm arrays in a dict; they are
    refused with a message that says so, not misread."""
    _, state = _trained_state(steps=1)
    path = tmp_path / "old.npz"
    gh.save_state(path, state)
    with np.load(path) as npz:
        arrays = dict(npz)
    header = json.loads(arrays["__gradhpo_header__"].tobytes().decode())
    header["format_version"] = 1
    arrays["__gradhpo_header__"] = np.frombuffer(
        json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"written by gradhpo 0.1 "
                       r"\(checkpoint format 1\).*BilevelState.extra.*"
                       r"start from a new init"):
        gh.load_state(path, like=state)
