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
import time
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


def _checked_leaf(key_path: Any, leaf: Any) -> np.ndarray:
    """The leaf as a numpy array, refusing what :func:`load_state` could
    not give back exactly."""
    where = "state" + jax.tree_util.keystr(key_path)
    arr = _to_numpy(leaf)
    if arr.dtype.kind not in "biufc" and arr.dtype.name != "bfloat16" and (
            not jnp.issubdtype(arr.dtype, jnp.floating)):
        raise TypeError(
            f"{where} is {type(leaf).__name__} with dtype {arr.dtype}; "
            "checkpoints hold numeric arrays only (booleans, integers, "
            "floats, PRNG keys). Keep strings and objects out of the state "
            "(configuration belongs on the optimizer).")
    return arr


def save_state(path: PathLike, state: PyTree) -> None:
    """Saves ``state`` to ``path`` atomically.

    Args:
      path: the checkpoint file (conventionally ending in ``.npz``). Its
        directory must exist.
      state: any pytree of numeric arrays, typically a
        :class:`~gradhpo.BilevelState` (HyperDistill's distilled weights,
        batches and PRNG key included).

    Raises:
      TypeError: for a leaf :func:`load_state` could not give back: a
        string or another non-numeric object.

    A failed save removes its temporary file; a save also removes the
    temporary files of earlier writers of ``path`` that were killed
    (their process is gone, or the file is a day old).

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
        arr = _checked_leaf(key_path, leaf)
        arrays[f"leaf_{i}"] = np.frombuffer(
            np.ascontiguousarray(arr).tobytes(), dtype=np.uint8)
        entries.append({"path": jax.tree_util.keystr(key_path),
                        "shape": list(arr.shape), "dtype": arr.dtype.name})
    header = {"format_version": FORMAT_VERSION, "treedef": str(treedef),
              "leaves": entries}
    arrays[_HEADER] = np.frombuffer(json.dumps(header).encode(), np.uint8)

    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temp_prefix(path)
    _remove_stale_temporaries(directory, prefix)
    fd, tmp = tempfile.mkstemp(prefix=f"{prefix}{os.getpid()}.",
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


#: A temporary file older than this is stale whoever wrote it.
STALE_SECONDS = 24 * 3600


def _temp_prefix(path: str) -> str:
    return ".tmp-" + os.path.basename(path) + "."


def _remove_stale_temporaries(directory: str, prefix: str) -> None:
    """Removes temporary files of ``prefix`` left by killed writers: their
    process no longer exists on this host, or they are a day old."""
    try:
        names = os.listdir(directory)
    except OSError:  # pragma: no cover - the save itself will report it
        return
    now = time.time()
    for name in names:
        if not name.startswith(prefix):
            continue
        full = os.path.join(directory, name)
        pid = name[len(prefix):].split(".", 1)[0]
        try:
            old = now - os.path.getmtime(full) > STALE_SECONDS
            if old or (pid.isdigit() and not _alive(int(pid))):
                os.remove(full)
        except OSError:
            pass   # another writer finished or removed it first


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # pragma: no cover - e.g. another user's process
        return True
    return True


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


class _Malformed(Exception):
    """What is wrong with a checkpoint file (becomes a ValueError)."""


def _read(path: str) -> tuple:
    """The file's header and arrays, or :class:`_Malformed`."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            if _HEADER not in npz.files:
                raise _Malformed("it has no gradhpo header")
            header = json.loads(npz[_HEADER].tobytes().decode())
            _check_header(header)
            arrays = {}
            for i in range(len(header["leaves"])):
                name = f"leaf_{i}"
                if name not in npz.files:
                    raise _Malformed(f"the array of leaf {i} is missing")
                arrays[name] = npz[name]
    except _Malformed:
        raise
    except Exception as e:   # zip, zlib, npy and json errors alike
        raise _Malformed(f"it is not a readable .npz archive "
                         f"({type(e).__name__}: {e})") from e
    return header, arrays


def _check_header(header: Any) -> None:
    if not isinstance(header, dict):
        raise _Malformed("its header is not a JSON object")
    version = header.get("format_version")
    if type(version) is not int:
        raise _Malformed(f"its format version {version!r} is not an "
                         "integer")
    if version == 1:
        raise _Malformed(
            "it was written by gradhpo 0.1 (checkpoint format 1), whose "
            "states kept algorithm-specific arrays in a free-form dict "
            "(BilevelState.extra); gradhpo 0.2 reads format 2, with typed "
            "records (BilevelState.algorithm_state), and cannot map the old "
            "layout safely. Resume that run with gradhpo 0.1, or start "
            "from a new init")
    if version != FORMAT_VERSION:
        raise _Malformed(f"it has checkpoint format version {version}; "
                         f"this gradhpo reads version {FORMAT_VERSION}")
    leaves = header.get("leaves")
    if not isinstance(header.get("treedef"), str) or not isinstance(
            leaves, list):
        raise _Malformed("its header lacks the tree structure or the "
                         "list of leaves")
    for i, entry in enumerate(leaves):
        ok = (isinstance(entry, dict)
              and isinstance(entry.get("path"), str)
              and isinstance(entry.get("dtype"), str)
              and isinstance(entry.get("shape"), list)
              and all(type(n) is int and n >= 0 for n in entry["shape"]))
        if not ok:
            raise _Malformed(f"the header entry of leaf {i} is malformed: "
                             f"{entry!r}"[:200])
        try:
            dtype = jnp.dtype(entry["dtype"])
        except TypeError:
            raise _Malformed(f"leaf {i} has the unknown dtype "
                             f"{entry['dtype']!r}") from None
        if dtype.kind not in "biufc" and dtype.name != "bfloat16":
            raise _Malformed(f"leaf {i} has the non-numeric dtype "
                             f"{entry['dtype']!r}")


def load_state(path: PathLike, like: PyTree) -> PyTree:
    """Loads a checkpoint written by :func:`save_state`.

    Args:
      path: the checkpoint file.
      like: a template with the same tree structure, shapes and dtypes (for
        example ``opt.init(params, hyperparams)`` for the same model and
        optimizer); PRNG key leaves are restored as keys, numpy leaves as
        numpy arrays, JAX leaves as JAX arrays.

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
      ValueError: one kind of error for every other problem, naming the
        file and what is wrong: not a gradhpo checkpoint, a damaged or
        hand-edited file, another format version, a state that does not
        match ``like`` (the message names the first differing leaf), or a
        64-bit leaf that JAX would narrow (without ``jax_enable_x64``).
    """
    path = os.fspath(path)
    try:
        header, arrays = _read(path)
    except _Malformed as e:
        raise ValueError(f"{path} is not a readable gradhpo checkpoint: "
                         f"{e}.") from e
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
        dtype = jnp.dtype(entry["dtype"])
        raw = arrays[f"leaf_{i}"]
        expected = int(np.prod(entry["shape"])) * dtype.itemsize
        if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size != expected:
            raise ValueError(
                f"{path} is not a readable gradhpo checkpoint: leaf "
                f"{entry['path']} holds {raw.size} bytes of {raw.dtype}, "
                f"not the {expected} bytes of {entry['dtype']} "
                f"{tuple(entry['shape'])} its header announces.")
        arr = np.frombuffer(raw.tobytes(), dtype=dtype).reshape(
            entry["shape"])
        if isinstance(ref, jax.Array):
            restored = jnp.asarray(arr)
            if restored.dtype != arr.dtype:
                raise ValueError(
                    f"{path}: leaf {entry['path']} is {arr.dtype}, which "
                    f"JAX would narrow to {restored.dtype}; enable "
                    "jax_enable_x64 to load it.")
            if jnp.issubdtype(ref.dtype, jax.dtypes.prng_key):
                restored = jax.random.wrap_key_data(
                    restored, impl=jax.random.key_impl(ref))
        else:   # numpy arrays and Python numbers keep their exact dtype
            restored = arr.copy() if arr.ndim else arr[()]
        leaves.append(restored)
    return jax.tree_util.tree_unflatten(treedef, leaves)
