r"""The abstract bilevel optimizer: the contract every algorithm follows.

A bilevel problem

.. math::

   \min_\lambda L_{val}(w^*(\lambda), \lambda) \quad\text{s.t.}\quad
   w^*(\lambda) \approx \operatorname{argmin}_w L_{tr}(w, \lambda)

is solved online: each :meth:`BilevelOptimizer.step` takes inner optimizer
step(s) on :math:`w` and one outer step on :math:`\lambda` along a
hypergradient. The algorithms differ only in how the hypergradient is
approximated.
"""

import abc
import copy
import functools
import inspect
import numbers
import warnings
import weakref
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradhpo.core.state import (BASE_METADATA_KEYS, BilevelState,
                                float_dtype, initial_metadata)
from gradhpo.utils import gradients as gr
from gradhpo.utils import tree as tu
from gradhpo.utils import validation as val
from gradhpo.utils.types import DataBatch, InnerOptimizer, LossFn, PyTree


# -- configuration as a value ------------------------------------------------

class _Identity:
    """Wraps an unhashable option so it compares by identity."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: Any) -> bool:
        return isinstance(other, _Identity) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


def _freeze(value: Any) -> Any:
    """A hashable stand-in for an option, equal for equal options.

    Numbers, strings and ``None`` stand for themselves; containers and
    arrays (bounds, trainable masks) are compared by content; functions and
    optax transformations by the objects themselves (so two optax
    transformations built by two calls of ``optax.sgd(0.1)`` differ: their
    ``init``/``update`` are distinct closures); anything unhashable by
    identity.
    """
    if value is None or isinstance(value, (str, bool, numbers.Number)):
        return (type(value).__name__, value)
    if isinstance(value, dict):
        return ("dict",) + tuple(sorted(
            ((repr(k), _freeze(v)) for k, v in value.items()),
            key=lambda kv: kv[0]))
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return (type(value).__name__,) + tuple(_freeze(v) for v in value)
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        arr = np.asarray(value)
        return ("array", arr.dtype.str, arr.shape, arr.tobytes())
    try:
        hash(value)
    except TypeError:
        return _Identity(value)
    return value


class _Compiled:
    """The compiled methods of one optimizer configuration.

    It holds ``config``, a shallow copy of the first optimizer built with
    this configuration (not the optimizer itself: the copy does not point
    back here, so no reference cycle keeps anything alive), the jitted
    methods, and small host-side caches. Optimizers hold it; the registry
    below holds it only weakly, so it is freed with the last optimizer
    that uses it, together with everything the losses close over.
    """

    def __init__(self, config: "BilevelOptimizer") -> None:
        self.config = config
        self.functions: Dict[str, Callable] = {}
        #: host-side checks already done, keyed by the caller (e.g. the
        #: warm start's bounds check per hyperparameter tree signature)
        self.checked: set = set()
        self.calls = 0
        self.warned = False

    #: How often (in calls) the skip count of the incoming state is read.
    WATCH_EVERY = 64

    def watch(self, state: BilevelState, owner: str) -> None:
        """Warns once per configuration when steps are being skipped for
        non-finite values (training that diverges says so). Every
        :attr:`WATCH_EVERY` calls it reads the incoming state's
        ``nonfinite_count``, and only if it is already computed: it never
        waits for the device, and it is silent under a user's trace."""
        if self.warned:
            return
        self.calls += 1
        if self.calls % self.WATCH_EVERY != 1:
            return
        count = state.metadata.get("nonfinite_count")
        if not isinstance(count, jax.Array) or isinstance(
                count, jax.core.Tracer) or not count.is_ready():
            return
        skipped = int(np.max(np.asarray(count)))
        if skipped > 0:
            self.warned = True
            warnings.warn(
                f"{owner}: {skipped} update(s) were skipped so far because "
                "of non-finite values (state.metadata['nonfinite_count']); "
                "training may be diverging: lower the learning rates or "
                "check the data and losses. (Shown once per optimizer "
                "configuration.)", RuntimeWarning, stacklevel=3)

    def function(self, method: Callable, check: bool,
                 shardings: Any = None) -> Callable:
        """The jitted ``method``; with ``shardings`` (a pytree of
        shardings), one whose output is placed with them."""
        name = method.__name__ if shardings is None else (
            method.__name__, jax.tree.structure(shardings),
            tuple(jax.tree.leaves(shardings)))
        fn = self.functions.get(name)
        if fn is None:
            fn = jax.jit(functools.partial(
                _run_checked, self.config, method, check),
                out_shardings=shardings)
            self.functions[name] = fn
        return fn


#: configuration key -> _Compiled, shared by equal optimizers (weak values)
_REGISTRY: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def _run_checked(config: "BilevelOptimizer", method: Callable, check: bool,
                 *args: Any) -> Any:
    """The traced body of a compiled method: the host-side checks (on
    shapes and dtypes, at trace time: once per compilation), then the
    method."""
    if check:
        config._check_call(*args[:3])
    else:
        config._check_state_type(args[0])
    return method(config, *args)


class _OptimizerMeta(abc.ABCMeta):
    """Freezes an optimizer once its (whole) constructor has run, and
    attaches the compiled code of its configuration."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        obj = super().__call__(*args, **kwargs)
        key = obj._config_key()
        object.__setattr__(obj, "_key", key)
        bundle = _REGISTRY.get(key)
        if bundle is None:
            bundle = _Compiled(copy.copy(obj))
            _REGISTRY[key] = bundle
        object.__setattr__(obj, "_compiled", bundle)
        object.__setattr__(obj, "_frozen", True)
        return obj


def compiled(method: Optional[Callable] = None, *,
             check_batches: bool = True) -> Callable:
    """Compiles a pure method with :func:`jax.jit`, the optimizer static.

    Use ``@compiled`` on the methods of a :class:`BilevelOptimizer`
    subclass that take a :class:`~gradhpo.BilevelState` first (and, with
    ``check_batches``, the ``(state, train_batch, val_batch)`` of
    :meth:`~BilevelOptimizer.step`).

    * The compiled function belongs to the optimizer's *configuration*, not
      to the object: optimizers built from the same loss functions, optax
      transformations and options (compared as values; functions and optax
      transformations by identity) share it, and it is freed with the last
      of them (nothing is kept alive by a cache).
    * The host-side checks (the state's type and algorithm, the leading
      step axis of the batches, both losses returning floating scalars)
      run while the method is traced, that is once per compilation; a
      repeated call costs one jitted dispatch.
    * Arguments may be passed by position or by keyword.

    The wrapper is a plain function, so it can itself be wrapped in
    :func:`jax.jit`, :func:`jax.vmap` or :func:`jax.lax.scan`.
    """
    if method is None:
        return functools.partial(compiled, check_batches=check_batches)
    signature = inspect.signature(method)
    returns_state = signature.return_annotation in (BilevelState,
                                                    "BilevelState")

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if kwargs:
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            args = tuple(bound.arguments.values())[1:]
        if not args or not isinstance(args[0], BilevelState):
            got = type(args[0]).__name__ if args else "nothing"
            raise TypeError(
                f"state must be a gradhpo.BilevelState (from "
                f"{type(self).__name__}.init), got {got}.")
        bundle = self.__dict__.get("_compiled")
        if bundle is None:
            # the configuration copy, called from inside a trace
            return method(self, *args)
        out = bundle.function(method, check_batches, _state_shardings(
            args[0]) if returns_state else None)(*args)
        if check_batches:
            bundle.watch(args[0], type(self).__name__)
        return out
    return wrapper


def _state_shardings(state: BilevelState) -> Optional[PyTree]:
    """The shardings of a state placed on several devices (e.g. by
    :func:`gradhpo.shard_state`), else ``None``.

    A method that returns the next state gives it these shardings: XLA
    would otherwise choose the output placement of the leaves it is free
    to (it may split a replicated bias whose update comes out split), and
    the next call, seeing other input shardings, would compile again. A
    state on one device (whose ``step`` counter is not spread over several
    devices) costs one attribute lookup here.
    """
    step = state.step
    if isinstance(step, jax.core.Tracer) or not isinstance(
            getattr(step, "sharding", None), jax.sharding.NamedSharding) \
            or len(step.sharding.device_set) < 2:
        return None
    leaves, treedef = jax.tree.flatten(state)
    if not all(isinstance(x, jax.Array) and not isinstance(
            x, jax.core.Tracer) for x in leaves):
        return None
    return treedef.unflatten([x.sharding for x in leaves])


class BilevelOptimizer(abc.ABC, metaclass=_OptimizerMeta):
    r"""Abstract base of every gradhpo algorithm.

    Subclasses are final: they implement :meth:`init`, :meth:`step` and
    :meth:`compute_hypergradient` and nothing else; shared machinery lives in
    :mod:`gradhpo.utils` and in the public hooks :meth:`initial_state`,
    :meth:`finish_step` and :meth:`check_state` (see *Adding an algorithm*
    in the documentation).

    An optimizer is an immutable value, like an optax transformation: its
    attributes are its configuration, and setting one after construction
    raises :class:`AttributeError` (build a new optimizer instead). Two
    optimizers with equal configuration (the same loss functions and optax
    objects, equal options) compare equal, hash alike and share their
    compiled code. JAX cannot tell two closures apart from their code, so
    losses or optax transformations created anew for each trial (a
    ``lambda`` in a loop, ``optax.sgd(0.1)`` called twice) make distinct
    configurations, each compiled once; build them once outside the loop
    to share. Compiled code is freed with the last optimizer that uses it.

    Args:
      train_loss: :math:`L_{tr}(w, \lambda; D)`, called as
        ``train_loss(params, hyperparams, batch)`` and returning a scalar. It
        includes the regularisers the hyperparameters control (Luketina's
        :math:`\tilde C_1`).
      val_loss: :math:`L_{val}(w, \lambda; V)`, same signature; usually
        independent of :math:`\lambda` (Luketina's :math:`C_2`). When
        :math:`\lambda` does enter it, the direct term
        :math:`\nabla_\lambda L_{val}` is included.
      inner_optimizer: the optimizer of :math:`w`: an
        :class:`optax.GradientTransformation`, or a callable
        ``hyperparams -> GradientTransformation`` (learning rate, momentum and
        decoupled weight decay then become differentiable hyperparameters;
        ``optax.inject_hyperparams`` states are refreshed from it).
      outer_optimizer: the optimizer of :math:`\lambda`, an
        :class:`optax.GradientTransformation` (``optax.adam`` is
        scale-free and a good default, since hypergradients are
        :math:`O(\eta)`).

    Batches are any pytrees of arrays. Non-floating hyperparameter leaves
    (integer choices) are carried unchanged and get a zero hypergradient.

    Example:
      Every algorithm is used the same way; swapping one for another changes
      only the constructor:

      >>> import jax.numpy as jnp, optax
      >>> import gradhpo as gh
      >>> def train_loss(w, hp, batch):
      ...     return jnp.sum((w - batch) ** 2) + hp["l2"] * jnp.sum(w ** 2)
      >>> def val_loss(w, hp, batch):
      ...     return jnp.sum((w - batch) ** 2)
      >>> opt: gh.BilevelOptimizer = gh.T1T2(
      ...     train_loss, val_loss, optax.sgd(0.1), optax.sgd(1.0))
      >>> state = opt.init(jnp.ones(2), {"l2": jnp.array(0.5)})
      >>> h = opt.compute_hypergradient(state, jnp.zeros(2), jnp.ones(2))
      >>> state = opt.step(state, jnp.zeros(2), jnp.ones(2))
      >>> # by hand: w1 = 0.7, v = 2 (w1 - 1) = -0.6, B = -0.1 * 2 w0 = -0.2,
      >>> # so h = 2 * (-0.2) * (-0.6) = 0.24 and l2 <- 0.5 - 0.24
      >>> print(f"{float(h['l2']):.3f} {float(state.hyperparams['l2']):.3f}")
      0.240 0.260
    """

    #: The type of ``state.algorithm_state`` this algorithm keeps.
    state_type: type = tuple

    def __init__(self, train_loss: LossFn, val_loss: LossFn,
                 inner_optimizer: InnerOptimizer,
                 outer_optimizer: Optional[optax.GradientTransformation],
                 *, allow_no_outer: bool = False) -> None:
        val.check_callable(train_loss, "train_loss")
        val.check_callable(val_loss, "val_loss")
        val.check_inner_optimizer(inner_optimizer)
        val.check_outer_optimizer(outer_optimizer, allow_none=allow_no_outer)
        self.train_loss = train_loss
        self.val_loss = val_loss
        self.inner_optimizer = inner_optimizer
        self.outer_optimizer = outer_optimizer
        # Number of inner steps per call whose batches carry a leading axis
        # (None: batches are passed as they are). Set by subclasses.
        self._train_steps: Optional[int] = None
        self._val_steps: Optional[int] = None

    # -- an immutable value --------------------------------------------------

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen", False):
            raise AttributeError(
                f"{type(self).__name__} is immutable: cannot set {name!r} "
                "after construction (compiled code and other optimizers may "
                f"share this configuration). Build a new optimizer, e.g. "
                f"{type(self).__name__}(..., {name}=...).")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        raise AttributeError(
            f"{type(self).__name__} is immutable: cannot delete {name!r}.")

    def _config_key(self) -> Any:
        """The configuration as a hashable value: the class and every
        public attribute set by the constructor (private ones are derived
        from them)."""
        return (type(self),) + tuple(
            (name, _freeze(value))
            for name, value in sorted(vars(self).items())
            if not name.startswith("_"))

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, BilevelOptimizer):
            return NotImplemented
        return self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        options = ", ".join(
            f"{k}={v!r}" for k, v in vars(self).items()
            if not k.startswith("_") and k not in (
                "train_loss", "val_loss", "inner_optimizer",
                "outer_optimizer"))
        return f"{type(self).__name__}({options})"

    # -- the contract ------------------------------------------------------

    @abc.abstractmethod
    def init(self, params: PyTree, hyperparams: PyTree, *,
             key: Optional[jax.Array] = None) -> BilevelState:
        r"""Creates the initial state.

        Args:
          params: initial model parameters :math:`w_0`, any pytree of arrays.
          hyperparams: initial hyperparameters :math:`\lambda_0`, any pytree
            of arrays or numbers. Floating leaves are tuned; integer leaves
            are held fixed. Python floats are converted to arrays of the
            default floating dtype.
          key: the state's randomness, a PRNG key (``jax.random.key(0)`` or
            ``jax.random.PRNGKey(0)``); algorithms that draw random numbers
            (HyperDistill's subsampling, the warm start's random direction)
            carry it in ``state.algorithm_state`` and split it as they go,
            the others ignore it. ``None`` means ``jax.random.PRNGKey(0)``.
            Give each member of a population its own key
            (:func:`~gradhpo.init_population` splits one).

        Returns:
          A :class:`~gradhpo.BilevelState` with ``step == 0``, the inner
          optimizer state :math:`s_0` (built from ``inner_optimizer``
          at :math:`\lambda_0`), the outer optimizer state, metadata
          initialised (losses NaN, ``nonfinite_count`` 0) and the
          algorithm's own record in ``algorithm_state``. Its tree, shapes
          and dtypes never change from step to step, so it can start a
          :func:`jax.lax.scan` over :meth:`step`.

        Raises:
          TypeError: if a leaf of ``params`` is not a real floating array,
            or a leaf of ``hyperparams`` is not a real floating or integer
            array or number (booleans, complex numbers, ``None`` and strings
            are rejected), ``key`` is not a PRNG key, or a callable
            ``inner_optimizer`` does not return an optax transformation.
          ValueError: if a tree is empty or holds NaN or inf,
            ``hyperparams`` has no floating leaf, or ``hyperparams`` does
            not match what a callable ``inner_optimizer`` reads.
        """

    @abc.abstractmethod
    def step(self, state: BilevelState, train_batch: DataBatch,
             val_batch: DataBatch) -> BilevelState:
        r"""One step: inner update(s) of :math:`w`, one outer update of
        :math:`\lambda`.

        The step uses :math:`\lambda_t` (before its update) for both the inner
        step and the hypergradient, and applies the hypergradient returned by
        :meth:`compute_hypergradient` for the same arguments.

        Args:
          state: the current state.
          train_batch: batch(es) :math:`D_t` for the inner step(s). An
            algorithm that takes :math:`K > 1` inner steps per call expects a
            leading axis of length :math:`K` on every leaf.
          val_batch: validation batch(es) :math:`V_t`, laid out likewise.

        Returns:
          The next state (``step`` incremented by one). Non-finite values are
          never propagated: a non-finite inner gradient or training loss, or
          an inner update that overflows, leaves ``params`` and
          ``inner_opt_state`` unchanged; a non-finite hypergradient or
          validation loss leaves ``hyperparams`` and ``outer_opt_state``
          unchanged; an outer update that is itself non-finite (overflow,
          an outer optimizer with a NaN rate) leaves the affected
          hyperparameters unchanged. Each event increments
          ``metadata["nonfinite_count"]``, and a warning is shown once per
          configuration when steps are being skipped.

        The method is pure and compiled once per input shape (arguments by
        position or keyword); it can be wrapped in :func:`jax.jit`,
        :func:`jax.vmap` (a population of states stacked on a leading axis)
        or :func:`jax.lax.scan`.
        """

    @abc.abstractmethod
    def compute_hypergradient(self, state: BilevelState,
                              train_batch: DataBatch,
                              val_batch: DataBatch) -> PyTree:
        r"""The hypergradient :meth:`step` would apply, without applying it.

        It includes the inner step(s) from ``state.params`` that
        :meth:`step` takes with the same arguments, so that
        ``step`` moves :math:`\lambda` along exactly this vector (through
        the outer optimizer).

        Args:
          state: the current state.
          train_batch: as in :meth:`step`.
          val_batch: as in :meth:`step`.

        Returns:
          A pytree shaped like ``state.hyperparams`` (zeros for integer
          leaves). It may be non-finite; :meth:`step` would then skip the
          outer update.
        """

    # -- hooks for the algorithms (public: see "Adding an algorithm") -------

    def check_state(self, state: BilevelState, train_batch: DataBatch,
                    val_batch: DataBatch) -> None:
        """Checks a state and batches before a compiled method is traced.

        Called at trace time, once per compilation, with abstract values
        (shapes and dtypes only). The base checks that ``state`` was built
        by this algorithm's :meth:`init`: its ``algorithm_state`` has type
        :attr:`state_type` and its metadata holds the common entries. An
        algorithm extends it (calling ``super().check_state``) to check
        what its own state must match, e.g. HyperDistill's :math:`D^*`
        against the training batch.

        Raises:
          ValueError: if ``state`` comes from another algorithm's ``init``
            or does not match the batches.
        """
        del train_batch, val_batch
        self._check_state_type(state)

    # -- internals -------------------------------------------------------------

    def _check_state_type(self, state: BilevelState) -> None:
        if not isinstance(state.algorithm_state, self.state_type):
            raise ValueError(
                "state.algorithm_state must be a "
                f"{self.state_type.__name__} (state was not built by "
                f"{type(self).__name__}.init), got "
                f"{type(state.algorithm_state).__name__}; build the state "
                f"with {type(self).__name__}.init.")
        missing = [n for n in BASE_METADATA_KEYS if n not in state.metadata]
        if missing:
            raise ValueError(
                f"state.metadata lacks {missing}: build the state with "
                f"{type(self).__name__}.init.")

    # -- hooks, continued --------------------------------------------------

    def host_cache(self) -> set:
        """A set for host-side checks already done for this configuration
        (e.g. a check of ``init``'s arguments per tree signature), shared
        by equal optimizers and freed with them."""
        bundle = self.__dict__.get("_compiled")
        return set() if bundle is None else bundle.checked

    def initial_state(self, params: PyTree, hyperparams: PyTree,
                      algorithm_state: Any = (),
                      metadata: Optional[Dict[str, Any]] = None
                      ) -> BilevelState:
        r"""The common part of :meth:`init`: a validated initial state.

        Checks ``params`` and ``hyperparams`` (clear errors for bad leaves),
        pins their dtypes (Python numbers become strongly typed arrays, so a
        jitted step never retraces), and builds the inner optimizer state
        :math:`s_0` at :math:`\lambda_0` and the outer optimizer state.

        Args:
          params: :math:`w_0`.
          hyperparams: :math:`\lambda_0`.
          algorithm_state: the algorithm's record (an instance of
            :attr:`state_type`).
          metadata: scalar entries to add to the common metadata.

        Returns:
          A :class:`~gradhpo.BilevelState` at step 0.
        """
        val.check_params(params)
        val.check_hyperparams(hyperparams, type(self).__name__)
        params = tu.as_strong_arrays(params)
        hyperparams = tu.as_strong_arrays(hyperparams)
        outer_state = (() if self.outer_optimizer is None else
                       gr.init_outer_state(self.outer_optimizer, hyperparams))
        return BilevelState(
            params=params,
            hyperparams=hyperparams,
            inner_opt_state=self._init_inner_state(params, hyperparams),
            outer_opt_state=outer_state,
            step=jnp.zeros((), jnp.int32),
            metadata=initial_metadata(**(metadata or {})),
            algorithm_state=algorithm_state)

    def finish_step(self, state: BilevelState, inner: gr.InnerStep,
                    hypergradient: PyTree, val_loss: jax.Array, *,
                    grad_evals: Any,
                    metadata: Optional[Dict[str, Any]] = None,
                    algorithm_state: Any = None,
                    outer: Optional[Callable] = None,
                    inner_skips: Optional[jax.Array] = None,
                    inner_guarded: bool = False) -> BilevelState:
        """The common end of :meth:`step`: guards and applies an inner step
        and an outer update, and records the metadata.

        The outer update is skipped (hyperparameters and outer state kept)
        when the hypergradient is non-finite or the inner step was skipped;
        each skip increments ``metadata["nonfinite_count"]``. One reduction
        of the hypergradient serves as the finiteness check and the norm.

        Args:
          state: the state the step started from.
          inner: the inner step from ``state``
            (:class:`gradhpo.utils.gradients.InnerStep`); kept only if
            ``inner.finite``.
          hypergradient: shaped like ``state.hyperparams``.
          val_loss: recorded as ``metadata["val_loss"]``.
          grad_evals: what this step cost, in gradient evaluations as
            :mod:`gradhpo.utils.cost` counts them (a Python number fixed at
            trace time, or a scalar array when it depends on the step);
            added to ``metadata["grad_evals"]``, skipped steps included.
          metadata: algorithm-specific scalar entries to record (cast to
            the dtypes they had at ``init``).
          algorithm_state: the new ``state.algorithm_state`` (default:
            unchanged).
          outer: ``outer(state, hypergradient) -> (hyperparams,
            outer_opt_state, metadata)`` replacing the plain outer optimizer
            update (Greedy's masked, projected update); it only sees finite
            hypergradients, and its metadata is zeroed when skipped.
          inner_skips: the number of skipped inner steps when ``inner``
            summarises several (default: 1 if ``inner`` is non-finite).
          inner_guarded: ``inner`` was already guarded inside its update
            (``guard=True`` in :mod:`gradhpo.utils.gradients`), which saves
            a pass over the weights and optimizer state.

        Returns:
          The next state, ``step`` incremented.
        """
        if not inner_guarded:
            inner = gr.guard_inner_step(inner, state.params,
                                        state.inner_opt_state)
        sq = tu.sum_squares(hypergradient)
        # a hypergradient through a skipped inner step is not applied either
        outer_ok = (jnp.isfinite(sq) & inner.finite
                    & jnp.isfinite(jnp.asarray(val_loss)))
        safe = tu.select(outer_ok, hypergradient, tu.zeros_like(hypergradient))
        if outer is None:
            new_hp, new_outer = gr.outer_update(
                self.outer_optimizer, safe, state.outer_opt_state,
                state.hyperparams)
            outer_meta = {}
        else:
            new_hp, new_outer, outer_meta = outer(state, safe)
        new_hp = tu.select(outer_ok, new_hp, state.hyperparams)
        new_outer = tu.select(outer_ok, new_outer, state.outer_opt_state)
        # the result too: an outer update can overflow, or an outer
        # optimizer with a NaN rate turn a finite hypergradient into NaN.
        # Such entries keep their value, element by element (a select of
        # the whole update would wait for a reduction over it: one more
        # pass over the hyperparameters and the outer state), and the
        # event is counted like a skipped update
        result_ok = tu.all_finite(new_hp)
        new_hp = jax.tree.map(
            lambda n, o: jnp.where(jnp.isfinite(n), n, o)
            if tu.is_float_leaf(n) else n, new_hp, state.hyperparams)
        outer_ok = outer_ok & result_ok
        if inner_skips is None:
            inner_skips = jnp.logical_not(inner.finite).astype(jnp.int32)
        bad = inner_skips + jnp.logical_not(outer_ok).astype(jnp.int32)
        fdt = float_dtype()
        meta = dict(state.metadata)
        meta.update(
            train_loss=inner.loss.astype(fdt),
            val_loss=jnp.asarray(val_loss).astype(fdt),
            hypergradient_norm=jnp.sqrt(sq).astype(fdt),
            nonfinite_count=state.metadata["nonfinite_count"] + bad,
            grad_evals=state.metadata["grad_evals"] + grad_evals)
        meta.update({k: jnp.where(outer_ok, v, jnp.zeros_like(v))
                     for k, v in outer_meta.items()})
        meta.update(metadata or {})
        meta = {k: jnp.asarray(v).astype(jnp.result_type(state.metadata[k]))
                if k in state.metadata else v for k, v in meta.items()}
        if algorithm_state is None:
            algorithm_state = state.algorithm_state
        return state.replace(
            params=inner.params, inner_opt_state=inner.opt_state,
            hyperparams=new_hp, outer_opt_state=new_outer,
            step=state.step + 1, metadata=meta,
            algorithm_state=algorithm_state)

    def _check_call(self, state: BilevelState, train_batch: DataBatch = None,
                    val_batch: DataBatch = None) -> None:
        """The checks of a compiled call, run at trace time (once per
        compilation) on abstract values: the algorithm's
        :meth:`check_state`, the leading step axis of the batches, and that
        both losses return floating scalars (by :func:`jax.eval_shape`,
        which traces the losses but runs nothing)."""
        self.check_state(state, train_batch, val_batch)
        train_one = _one_step_batch(train_batch, self._train_steps,
                                    "train_batch")
        val_one = _one_step_batch(val_batch, self._val_steps, "val_batch")
        self._check_loss("train_loss", self.train_loss, state.params,
                         state.hyperparams, train_one)
        self._check_loss("val_loss", self.val_loss, state.params,
                         state.hyperparams, val_one)
        self._warn_unused(state, train_one, val_one)

    @staticmethod
    def _check_loss(name: str, loss: LossFn, params: PyTree,
                    hyperparams: PyTree, batch: DataBatch) -> None:
        """Checks ``loss`` runs on the state's shapes and returns a floating
        scalar, by shape evaluation; a failure inside the user's loss is
        reported with what it was called with."""
        args = _abstract((params, hyperparams, batch))
        try:
            out = jax.eval_shape(loss, *args)
        except (KeyError, IndexError) as e:
            raise ValueError(
                f"{name}(params, hyperparams, batch) raised "
                f"{type(e).__name__}: {e} on the state's arrays; it reads an "
                "entry that is not there. The state holds "
                f"{_leaf_names(hyperparams)}: add the missing "
                "hyperparameter at init, or fix its name.") from e
        except (TypeError, ValueError, AttributeError) as e:
            error = TypeError if isinstance(e, TypeError) else ValueError
            raise error(
                f"{name}(params, hyperparams, batch) failed on the state's "
                f"arrays with {type(e).__name__}: {e}. Losses are called as "
                "loss(params, hyperparams, batch): check the argument order "
                f"and the shapes (params: {_shapes(params)}, hyperparams: "
                f"{_shapes(hyperparams)}).") from e
        val.check_scalar_loss(out, name)

    def _warn_unused(self, state: BilevelState, train_one: DataBatch,
                     val_one: DataBatch) -> None:
        """Warns about floating hyperparameters that neither loss nor the
        inner optimizer reads (a misspelled name): their hypergradient is
        always zero. Traced once per compilation, on shapes only."""
        lam_f, rest = tu.partition_float(state.hyperparams)
        leaves = jax.tree.leaves(lam_f)
        if not leaves:
            return

        def uses(lam_f, params, opt_state, train, valid):
            lam = tu.combine(lam_f, rest)
            grads = tu.zeros_like(params)
            update = gr.apply_inner_update(self.inner_optimizer, grads,
                                           opt_state, params, lam)
            # the optimizer's init may read one too (e.g. an initial
            # accumulator value)
            initial = gr.init_inner_state(self.inner_optimizer, params, lam)
            return (self.train_loss(params, lam, train),
                    self.val_loss(params, lam, valid), update, initial)
        try:
            jaxpr = jax.make_jaxpr(uses)(*_abstract(
                (lam_f, state.params, state.inner_opt_state, train_one,
                 val_one))).jaxpr
        except Exception:   # pragma: no cover - the step will report it
            return
        used = set()
        for eqn in jaxpr.eqns:
            used.update(v for v in eqn.invars if not hasattr(v, "val"))
        used.update(v for v in jaxpr.outvars if not hasattr(v, "val"))
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_flatten_with_path(lam_f)[0]]
        unused = [p for p, v in zip(paths, jaxpr.invars[:len(leaves)])
                  if v not in used]
        if unused:
            warnings.warn(
                f"{type(self).__name__}: "
                f"{', '.join('hyperparams' + p for p in unused)} "
                "is read by neither train_loss, val_loss nor "
                "inner_optimizer, so its hypergradient is always zero. A "
                "misspelled name? Remove it, or make it an integer to hold "
                "it fixed.", UserWarning, stacklevel=2)

    def _init_inner_state(self, params: PyTree,
                          hyperparams: PyTree) -> PyTree:
        try:
            tx = gr.resolve_inner_optimizer(self.inner_optimizer,
                                            hyperparams)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            raise ValueError(
                "hyperparams do not match what inner_optimizer expects: "
                "building the inner optimizer from hyperparams raised "
                f"{type(e).__name__}: {e}. Pass every hyperparameter the "
                "callable reads (e.g. {'lr': 0.1} for lambda hp: "
                "optax.sgd(hp['lr'])).") from e
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                "inner_optimizer(hyperparams) must return an "
                f"optax.GradientTransformation, got {type(tx).__name__}; "
                "write e.g. lambda hp: optax.sgd(hp['lr']).")
        return tx.init(params)


def _leaf_names(tree: PyTree) -> str:
    return ", ".join("hyperparams" + jax.tree_util.keystr(p) for p, _ in
                     jax.tree_util.tree_flatten_with_path(tree)[0])


def _shapes(tree: PyTree) -> Any:
    return jax.tree.map(lambda x: tuple(jnp.shape(x)), tree)


def _abstract(tree: PyTree) -> PyTree:
    """Shapes and dtypes of every leaf (tracers included)."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)),
        tree)


def _one_step_batch(batch: DataBatch, steps: Optional[int],
                    name: str) -> DataBatch:
    """Shapes of the batch of a single inner step, after checking the
    leading step axis when ``steps`` is set."""
    if steps is None or not jax.tree.leaves(batch):
        return batch
    length = tu.first_axis_length(batch, name)
    if length != steps:
        raise ValueError(
            f"{name} must have a leading axis of length {steps} on every "
            f"leaf (one slice per inner step), got length {length}.")
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x)[1:], jnp.result_type(x)),
        batch)
