r"""Populations of configurations and data-parallel steps.

Two ways to use more hardware with the same optimizer object:

* **Populations** (many configurations in one XLA program): stack the states
  of several hyperparameter settings along a leading axis with
  :func:`init_population`, then ``jax.vmap(opt.step, in_axes=(0, None,
  None))`` advances all of them on the same batch at once.
* **Data parallelism** (one configuration, a batch split over devices):
  place the state replicated and the batch sharded along its example axis
  with :func:`replicate` and :func:`shard_batch`; the compiled step then runs
  on every device of the mesh, and XLA inserts the all-reduces that the
  losses' means need. The result equals the single-device step up to
  floating-point summation order. On several hosts, call
  :func:`jax.distributed.initialize` first on every host; :func:`make_mesh`
  then spans all global devices, and each host passes its local part of the
  batch through :func:`jax.make_array_from_process_local_data` instead of
  :func:`shard_batch`.
* **Sharded state** (FSDP-style, for states too large for one device):
  :func:`shard_state` splits every large leaf of a state (weights,
  hyperparameters, both optimizer states, the algorithm's own arrays)
  along one axis over the mesh, so each device holds about ``1/n`` of it;
  the compiled step keeps those shardings (XLA propagates them through the
  jitted step), and can be combined with a sharded batch.
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gradhpo.utils.types import DataBatch, PyTree


def stack(trees: Sequence[PyTree]) -> PyTree:
    """Stacks pytrees of the same structure along a new leading axis."""
    if not trees:
        raise ValueError("trees must be a non-empty sequence of pytrees.")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: PyTree) -> list:
    """Inverse of :func:`stack`: a list of the slices along the first axis."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return []
    n = leaves[0].shape[0]
    return [treedef.unflatten([x[i] for x in leaves]) for i in range(n)]


def init_population(optimizer, params: PyTree,
                    hyperparams: Sequence[PyTree], *,
                    key: Optional[jax.Array] = None,
                    **init_kwargs) -> PyTree:
    """States for several hyperparameter settings, stacked on axis 0.

    Args:
      optimizer: any :class:`~gradhpo.BilevelOptimizer`.
      params: the initial parameters, shared by every member (pass a stacked
        tree and ``jax.vmap`` the ``init`` yourself for per-member weights).
      hyperparams: a sequence (list or tuple) of hyperparameter pytrees of
        one structure, one per member.
      key: a PRNG key, split into one key per member (so members draw
        distinct random numbers), or a stack of ``len(hyperparams)`` keys to
        use as they are. ``None`` splits ``jax.random.PRNGKey(0)``.
      **init_kwargs: passed to ``optimizer.init`` (e.g. ``batch=`` for
        HyperDistill).

    Returns:
      A :class:`~gradhpo.BilevelState` whose every leaf has a leading axis
      of length ``len(hyperparams)``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> loss = lambda w, hp, b: jnp.sum((w - b) ** 2) + hp * jnp.sum(w**2)
      >>> opt = gh.T1T2(loss, lambda w, hp, b: jnp.sum((w - b) ** 2),
      ...               optax.sgd(0.1), optax.adam(0.01))
      >>> states = gh.init_population(opt, jnp.zeros(3), [0.1, 0.5, 1.0])
      >>> step = jax.vmap(opt.step, in_axes=(0, None, None))
      >>> states = step(states, jnp.ones(3), jnp.ones(3))
      >>> states.hyperparams.shape
      (3,)
    """
    if not hasattr(optimizer, "init") or not hasattr(optimizer, "step"):
        raise TypeError(
            "optimizer must be a gradhpo.BilevelOptimizer (e.g. gh.T1T2(...)"
            f"), got {type(optimizer).__name__}.")
    if not isinstance(hyperparams, (list, tuple)):
        raise TypeError(
            "hyperparams must be a list or tuple of hyperparameter pytrees "
            f"(one per member), got {type(hyperparams).__name__}; for one "
            "setting write [hyperparams].")
    if not hyperparams:
        raise ValueError("hyperparams must hold at least one setting, got "
                         "an empty sequence.")
    n = len(hyperparams)
    keys = _member_keys(key, n)
    return stack([optimizer.init(params, hp, key=k, **init_kwargs)
                  for hp, k in zip(hyperparams, keys)])


def _member_keys(key, n: int) -> list:
    """``n`` keys: ``key`` split, or a stack of ``n`` keys as given."""
    if key is None:
        key = jax.random.PRNGKey(0)
    typed = isinstance(key, jax.Array) and jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key)
    single = key.shape == () if typed else np.shape(key) == (2,)
    if single:
        return list(jax.random.split(key, n))
    if np.shape(key)[:1] == (n,):
        return list(key)
    raise ValueError(
        f"key must be one PRNG key or a stack of {n} keys (one per member "
        f"of hyperparams), got shape {np.shape(key)}.")


def make_mesh(devices: Optional[Sequence[jax.Device]] = None,
              axis_name: str = "batch") -> Mesh:
    """A one-dimensional device mesh for data parallelism.

    Args:
      devices: the devices to use (default: all, ``jax.devices()``).
      axis_name: the mesh axis the batch is split along.

    Example:
      >>> import jax
      >>> import gradhpo as gh
      >>> mesh = gh.make_mesh()
      >>> mesh.shape["batch"] == len(jax.devices())
      True
    """
    if devices is None:
        devices = jax.devices()
    if isinstance(devices, (str, bytes)) or not isinstance(
            devices, (list, tuple, np.ndarray)):
        raise TypeError(
            "devices must be None (all devices) or a non-empty list of "
            f"jax.Device (e.g. jax.devices()[:4]), got {devices!r}.")
    devices = list(devices)
    if not devices or not all(isinstance(d, jax.Device) for d in devices):
        raise ValueError(
            "devices must be a non-empty list of jax.Device (e.g. "
            f"jax.devices()[:4]), got {devices!r}.")
    if not isinstance(axis_name, str) or not axis_name:
        raise TypeError(f"axis_name must be a non-empty str, got "
                        f"{axis_name!r}.")
    return Mesh(np.array(devices), (axis_name,))


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf of ``tree`` (e.g. a state) on all mesh devices.

    Example:
      >>> import jax.numpy as jnp
      >>> import gradhpo as gh
      >>> mesh = gh.make_mesh()
      >>> w = gh.replicate({"w": jnp.ones(3)}, mesh)
      >>> w["w"].sharding.is_fully_replicated
      True
    """
    _check_mesh(mesh)
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def _check_mesh(mesh: Mesh, axis_name: Optional[str] = None) -> None:
    if not isinstance(mesh, Mesh):
        raise TypeError("mesh must be a jax.sharding.Mesh (from "
                        f"gradhpo.make_mesh()), got {type(mesh).__name__}.")
    if axis_name is not None and axis_name not in mesh.shape:
        raise ValueError(
            f"axis_name must be an axis of the mesh, one of "
            f"{list(mesh.shape)}; got {axis_name!r}.")


def shard_batch(batch: DataBatch, mesh: Mesh,
                axis_name: str = "batch", axis: int = 0) -> DataBatch:
    """Splits every leaf of ``batch`` along ``axis`` over the mesh devices.

    Args:
      batch: a pytree of arrays whose ``axis`` has a size divisible by the
        number of devices.
      mesh: from :func:`make_mesh`.
      axis_name: the mesh axis to split over.
      axis: the example axis of the leaves (1 for batches that carry a
        leading step axis, as Greedy's with ``horizon > 1``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import gradhpo as gh
      >>> mesh = gh.make_mesh()
      >>> x = gh.shard_batch(jnp.ones((8, 3)), mesh)
      >>> x.shape
      (8, 3)
    """
    _check_mesh(mesh, axis_name)
    if isinstance(axis, bool) or not isinstance(axis, int) or axis < 0:
        raise ValueError(f"axis must be an int >= 0 (the example axis of "
                         f"every leaf), got {axis!r}.")
    n = mesh.shape[axis_name]

    def put(x):
        x = jnp.asarray(x)
        if x.ndim <= axis or x.shape[axis] % n:
            raise ValueError(
                f"batch leaves must have an axis {axis} divisible by the "
                f"{n} devices of the mesh, got a leaf of shape {x.shape}.")
        spec = [None] * x.ndim
        spec[axis] = axis_name
        return jax.device_put(x, NamedSharding(mesh, PartitionSpec(*spec)))
    return jax.tree.map(put, batch)


def shard_state(tree: PyTree, mesh: Mesh, axis_name: Optional[str] = None,
                *, min_size: int = 1024) -> PyTree:
    """Shards every large array leaf of ``tree`` over one mesh axis.

    The rule, leaf by leaf: an array with at least ``min_size`` elements is
    split along its largest axis whose length is divisible by the size
    ``n`` of the mesh axis (the first such axis on a tie), so each device
    holds ``1/n`` of it; every other leaf (scalars such as ``state.step``
    and the metadata, small arrays, arrays with no divisible axis, PRNG
    keys) is replicated on all devices of the mesh. Applied to a whole
    :class:`~gradhpo.BilevelState` after ``init``, the weights, the
    hyperparameters, the inner and outer optimizer states and the
    algorithm's own arrays (HyperDistill's :math:`w^*`, Implicit's warm
    start) are sharded alike, since they mirror the same shapes. Every
    leaf then lies on the mesh, so the jitted step sees the same input
    shardings at every call and returns its state with them (XLA
    propagates them), and is compiled once.

    Args:
      tree: any pytree of arrays or numbers, e.g. a state, or the
        ``params`` and ``hyperparams`` before ``init`` (whose optimizer
        states then come out sharded like them).
      mesh: a :class:`jax.sharding.Mesh`, e.g. from :func:`make_mesh`.
      axis_name: the mesh axis to shard over; ``None`` (default) means the
        only axis of a one-dimensional mesh.
      min_size: leaves with fewer elements are replicated (splitting them
        saves little memory and costs collectives); an int ``>= 0``.

    Returns:
      ``tree`` with every leaf a :class:`jax.Array` placed with a
      :class:`~jax.sharding.NamedSharding` over ``mesh``.

    Raises:
      TypeError: if ``mesh`` is not a :class:`~jax.sharding.Mesh`,
        ``axis_name`` not a str, ``min_size`` not an int, or a leaf of
        ``tree`` not an array or number.
      ValueError: if ``axis_name`` is not an axis of ``mesh`` (or is
        ``None`` for a mesh of several axes), or ``min_size < 0``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> def train_loss(w, hp, b):
      ...     return jnp.mean((b @ w) ** 2) + jnp.sum(hp * w ** 2)
      >>> def val_loss(w, hp, b):
      ...     return jnp.mean((b @ w - 1.0) ** 2)
      >>> opt = gh.T1T2(train_loss, val_loss, optax.sgd(0.1),
      ...               optax.adam(0.01))
      >>> mesh = gh.make_mesh(jax.devices()[:1], axis_name="model")
      >>> state = opt.init(jnp.ones((64, 32)), jnp.full((64, 32), 0.01))
      >>> state = gh.shard_state(state, mesh, min_size=1024)
      >>> state.params.sharding.spec[0]   # split along its largest axis
      'model'
      >>> state.step.sharding.is_fully_replicated     # a scalar
      True
      >>> state = opt.step(state, jnp.ones((8, 64)), jnp.ones((8, 64)))
      >>> state.params.sharding.spec[0]   # the step keeps the sharding
      'model'
    """
    if not isinstance(mesh, Mesh):
        raise TypeError("mesh must be a jax.sharding.Mesh (from "
                        f"gradhpo.make_mesh()), got {type(mesh).__name__}.")
    if axis_name is None:
        if len(mesh.axis_names) != 1:
            raise ValueError(
                "axis_name must name the mesh axis to shard over when the "
                f"mesh has several axes {list(mesh.axis_names)}; got None.")
        axis_name = mesh.axis_names[0]
    if not isinstance(axis_name, str):
        raise TypeError(f"axis_name must be a str (an axis of the mesh) or "
                        f"None, got {axis_name!r}.")
    _check_mesh(mesh, axis_name)
    if isinstance(min_size, bool) or not isinstance(
            min_size, (int, np.integer)):
        raise TypeError(f"min_size must be an int (a number of elements), "
                        f"got {min_size!r}.")
    if min_size < 0:
        raise ValueError(f"min_size must be >= 0, got {min_size}.")
    n = mesh.shape[axis_name]
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(path, leaf):
        if not isinstance(leaf, (jax.Array, np.ndarray, np.generic,
                                 bool, int, float)):
            raise TypeError(
                f"tree{jax.tree_util.keystr(path)} must be an array or a "
                f"number to be placed on the mesh, got "
                f"{type(leaf).__name__}.")
        return jax.device_put(leaf, _leaf_sharding(
            leaf, mesh, axis_name, n, min_size, replicated))
    return jax.tree_util.tree_map_with_path(put, tree)


def _leaf_sharding(leaf, mesh: Mesh, axis_name: str, n: int, min_size: int,
                   replicated: NamedSharding) -> NamedSharding:
    """:func:`shard_state`'s rule for one leaf."""
    shape = np.shape(leaf)
    dtype = getattr(leaf, "dtype", None)
    if (dtype is not None and jax.dtypes.issubdtype(
            dtype, jax.dtypes.prng_key)) or not shape \
            or int(np.prod(shape)) < max(min_size, 1):
        return replicated
    # the largest divisible axis; the first one among equal lengths
    axes = sorted(range(len(shape)), key=lambda a: -shape[a])
    for a in axes:
        if shape[a] % n == 0:
            spec = [None] * len(shape)
            spec[a] = axis_name
            return NamedSharding(mesh, PartitionSpec(*spec))
    return replicated
