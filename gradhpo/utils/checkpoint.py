"""Atomic checkpoints of any pytree state (a :class:`~gradhpo.BilevelState`).

A checkpoint is one ``.npz`` file: every leaf's raw bytes, plus a JSON header
with the format version, the tree structure, and each leaf's path, shape and
dtype. Writing goes to a temporary file in the same directory, which is
flushed and fsynced and then renamed over the previous checkpoint
(``os.replace`` is atomic on POSIX and Windows), so a crash at any moment
leaves either the old or the new checkpoint, never a torn one.
"""

import io
import json
import os
import tempfile
import zipfile
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np

from gradhpo.utils.types import PyTree

#: Version 2 (gradhpo 0.2): algorithm states are typed records
#: (``BilevelState.algorithm_state``); version 1 held free-form dicts.
FORMAT_VERSION = 2
_HEADER = "__gradhpo_header__"
PathLike = Union[str, os.PathLike]


def _to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jnp.issubdtype(
            leaf.dtype, jax.dtypes.prng_key):
        leaf = jax.random.key_data(leaf)
    return np.asarray(leaf)


def save_state(path: PathLike, state: PyTree) -> None:
    """Saves ``state`` to ``path`` atomically.

    Args:
      path: the checkpoint file (conventionally ending in ``.npz``). Its
        directory must exist.
      state: any pytree of arrays, typically a :class:`~gradhpo.BilevelState`
        (HyperDistill's distilled weights, batches and PRNG key included).

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> opt = gh.T1T2(lambda w, h, b: jnp.sum(w ** 2) * h,
      ...               lambda w, h, b: jnp.sum(w), optax.sgd(0.1),
      ...               optax.adam(0.1))
      >>> state = opt.init(jnp.ones(3), jnp.array(0.5))
      >>> path = os.path.join(tempfile.mkdtemp(), "state.npz")
      >>> gh.save_state(path, state)
      >>> restored = gh.load_state(path, like=state)
      >>> bool(jnp.all(restored.params == state.params))
      True
    """
    path = os.fspath(path)
    leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(state)
    arrays = {}
    entries = []
    for i, (key_path, leaf) in enumerate(leaves_with_paths):
        arr = _to_numpy(leaf)
        arrays[f"leaf_{i}"] = np.frombuffer(
            np.ascontiguousarray(arr).tobytes(), dtype=np.uint8)
        entries.append({"path": jax.tree_util.keystr(key_path),
                        "shape": list(arr.shape), "dtype": arr.dtype.name})
    header = {"format_version": FORMAT_VERSION, "treedef": str(treedef),
              "leaves": entries}
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), np.uint8)

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path),
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
    """Makes the rename durable (POSIX); a no-op where unsupported."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _read(path: str) -> tuple:
    try:
        with open(path, "rb") as f:
            data = f.read()
        npz = np.load(io.BytesIO(data), allow_pickle=False)
        header = json.loads(npz[_HEADER].tobytes().decode())
    except FileNotFoundError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise ValueError(
            f"{path} is not a readable gradhpo checkpoint ({e}).") from e
    return npz, header


def load_state(path: PathLike, like: PyTree) -> PyTree:
    """Loads a checkpoint written by :func:`save_state`.

    Args:
      path: the checkpoint file.
      like: a template with the same tree structure, shapes and dtypes (for
        example ``opt.init(params, hyperparams)`` for the same model and
        optimizer); PRNG key leaves are restored as keys.

    Returns:
      The saved state, with the structure of ``like``; bit-for-bit the saved
      values.

    Example:
      >>> import os, tempfile, jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> opt = gh.T1T2(lambda w, h, b: h * jnp.sum(w ** 2),
      ...               lambda w, h, b: jnp.sum(w), optax.adam(0.1),
      ...               optax.adam(0.1))
      >>> state = opt.step(opt.init(jnp.ones(2), jnp.array(0.5)), None, None)
      >>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
      >>> gh.save_state(path, state)
      >>> like = opt.init(jnp.zeros(2), jnp.array(0.0))   # any values
      >>> int(gh.load_state(path, like=like).step)
      1

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is not a gradhpo checkpoint, has another format
        version, or does not match ``like`` (the message names the first
        differing leaf).
    """
    path = os.fspath(path)
    npz, header = _read(path)
    version = header.get("format_version")
    if version == 1:
        raise ValueError(
            f"{path} was written by gradhpo 0.1 (checkpoint format 1), whose "
            "states kept algorithm-specific arrays in a free-form dict "
            "(BilevelState.extra); gradhpo 0.2 reads format 2, with typed "
            "records (BilevelState.algorithm_state), and cannot map the old "
            "layout safely. Resume that run with gradhpo 0.1, or start from "
            "a new init.")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format version {version!r}; this "
            f"gradhpo reads version {FORMAT_VERSION}.")
    template, treedef = jax.tree_util.tree_flatten_with_path(like)
    saved = header["leaves"]
    if len(saved) != len(template) or header["treedef"] != str(treedef):
        raise ValueError(
            f"{path} holds a state with {len(saved)} leaves and structure "
            f"{header['treedef']}, which does not match `like` "
            f"({len(template)} leaves, structure {treedef}). Build `like` "
            "with the same model, optimizers and algorithm as the saved run.")
    leaves = []
    for i, ((key_path, ref), entry) in enumerate(zip(template, saved)):
        ref_np = _to_numpy(ref)
        name = jax.tree_util.keystr(key_path)
        if (entry["path"] != name or tuple(entry["shape"]) != ref_np.shape
                or entry["dtype"] != ref_np.dtype.name):
            raise ValueError(
                f"{path}: leaf {entry['path']} was saved with shape "
                f"{tuple(entry['shape'])} and dtype {entry['dtype']}, but "
                f"`like` has {name} with shape {ref_np.shape} and dtype "
                f"{ref_np.dtype.name}.")
        arr = np.frombuffer(npz[f"leaf_{i}"].tobytes(),
                            dtype=jnp.dtype(entry["dtype"]))
        arr = jnp.asarray(arr.reshape(entry["shape"]))
        if isinstance(ref, jax.Array) and jnp.issubdtype(
                ref.dtype, jax.dtypes.prng_key):
            arr = jax.random.wrap_key_data(arr, impl=jax.random.key_impl(ref))
        leaves.append(arr)
    return jax.tree_util.tree_unflatten(treedef, leaves)
