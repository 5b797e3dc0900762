"""Atomic checkpoints: bit-exact round trips, clear errors, crash safety."""

import json
import os
import subprocess
import sys

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


# -- malformed files: one clear ValueError ----------------------------------

def _saved(tmp_path):
    _, state = _trained_state(steps=1)
    path = tmp_path / "ckpt.npz"
    gh.save_state(path, state)
    return state, path


def _rewrite(path, edit):
    """Rewrites the checkpoint with ``edit(header, arrays)`` applied."""
    with np.load(path) as npz:
        arrays = dict(npz)
    header = json.loads(arrays["__gradhpo_header__"].tobytes().decode())
    edit(header, arrays)
    arrays["__gradhpo_header__"] = np.frombuffer(
        json.dumps(header).encode(), np.uint8)
    np.savez(path, **arrays)


HEADER_EDITS = [
    ("version-bool", lambda h, a: h.update(format_version=True),
     "format version True is not an integer"),
    ("version-missing", lambda h, a: h.pop("format_version"),
     "format version None is not an integer"),
    ("leaves-not-list", lambda h, a: h.update(leaves={"a": 1}),
     "lacks the tree structure or the list of leaves"),
    ("entry-not-dict", lambda h, a: h["leaves"].__setitem__(0, 7),
     "header entry of leaf 0 is malformed"),
    ("negative-shape",
     lambda h, a: h["leaves"][0].update(shape=[-1]),
     "header entry of leaf 0 is malformed"),
    ("unknown-dtype", lambda h, a: h["leaves"][0].update(dtype="float99"),
     "unknown dtype 'float99'"),
    ("object-dtype", lambda h, a: h["leaves"][0].update(dtype="object"),
     "non-numeric dtype 'object'"),
    ("missing-array", lambda h, a: a.pop("leaf_0"),
     "the array of leaf 0 is missing"),
    ("short-array", lambda h, a: a.update(leaf_0=a["leaf_0"][:-1]),
     "bytes of uint8, not the"),
    ("wrong-shape", lambda h, a: h["leaves"][0].update(shape=[999]),
     "saved with shape"),
]


@pytest.mark.parametrize("edit,message", [e[1:] for e in HEADER_EDITS],
                         ids=[e[0] for e in HEADER_EDITS])
def test_hand_made_headers_are_one_clear_error(tmp_path, edit, message):
    state, path = _saved(tmp_path)
    _rewrite(path, edit)
    with pytest.raises(ValueError, match=message) as info:
        gh.load_state(path, like=state)
    assert type(info.value) is ValueError
    assert str(path) in str(info.value)


def test_every_flipped_bit_is_a_value_error_or_loads_exactly(tmp_path):
    """Bit flips anywhere in the file (header, zip directory, data): each
    load either raises ValueError naming the file or returns leaves of the
    template's shapes and dtypes; never another exception type."""
    state, path = _saved(tmp_path)
    data = path.read_bytes()
    rng = np.random.default_rng(0)
    positions = rng.choice(len(data) * 8, size=300, replace=False)
    outcomes = {"error": 0, "loaded": 0}
    for bit in positions:
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        try:
            out = gh.load_state(path, like=state)
        except ValueError as e:
            assert str(path) in str(e)
            outcomes["error"] += 1
        else:
            chex.assert_trees_all_equal_shapes_and_dtypes(out, state)
            outcomes["loaded"] += 1
    assert outcomes["error"] > 0


def test_unloadable_leaves_are_refused_at_save(tmp_path):
    _, state = _trained_state(steps=0)
    for bad in ["adam", np.array(["a", "b"]), np.array([object()])]:
        with pytest.raises(TypeError, match=r"state.metadata\['note'\] is "
                           r".*checkpoints hold numeric arrays only"):
            gh.save_state(tmp_path / "s.npz",
                          state.replace(metadata={"note": bad}))
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())


def test_numpy_and_python_leaves_keep_their_exact_values(tmp_path):
    """Without x64 JAX would turn 1e-300 into 0 and 2**40 into 0; numpy and
    Python leaves come back as numpy values of the saved dtype."""
    tree = {"tiny": np.float64(1e-300), "big": 2 ** 40,
            "arr": np.array([1e-300, 2.0]), "i64": np.array(2 ** 40)}
    path = tmp_path / "t.npz"
    gh.save_state(path, tree)
    back = gh.load_state(path, like=tree)
    assert back["tiny"] == 1e-300 and back["tiny"].dtype == np.float64
    assert back["big"] == 2 ** 40 and back["i64"] == 2 ** 40
    np.testing.assert_array_equal(back["arr"], tree["arr"])


def test_stale_temporaries_of_killed_writers_are_removed(tmp_path):
    _, state = _trained_state(steps=0)
    path = tmp_path / "ckpt.npz"
    # a writer that was killed: its process is gone
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = tmp_path / f".tmp-ckpt.npz.{child.pid}.abc123"
    dead.write_bytes(b"partial")
    # a day-old file from any process
    old = tmp_path / f".tmp-ckpt.npz.{os.getpid()}.old"
    old.write_bytes(b"partial")
    os.utime(old, (1, 1))
    # a live writer's file (this process, recent) is left alone
    live = tmp_path / f".tmp-ckpt.npz.{os.getpid()}.live"
    live.write_bytes(b"in progress")
    other = tmp_path / ".tmp-other.npz.1.x"     # another checkpoint's
    other.write_bytes(b"x")
    gh.save_state(path, state)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["ckpt.npz", live.name, other.name])
