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
import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import optax

from gradhpo.core.state import BilevelState, initial_metadata, float_dtype
from gradhpo.core.types import DataBatch, InnerOptimizer, LossFn, PyTree
from gradhpo.utils import gradients as gr
from gradhpo.utils import tree as tu
from gradhpo.utils import validation as val


def compiled(method: Optional[Callable] = None, *,
             check_batches: bool = True) -> Callable:
    """Compiles a pure method with :func:`jax.jit`, the optimizer static.

    The optimizer object holds only configuration (losses, optax
    transformations, options) and is hashed by identity, so each optimizer
    compiles a method once per input shape; the state's step counter is an
    array, so stepping in a Python loop never retraces. The wrapper is a
    plain function (documented like the method it wraps), so it can itself be
    wrapped in :func:`jax.jit` or :func:`jax.vmap` by the user.

    With ``check_batches`` (for methods called as ``(state, train_batch,
    val_batch)``), the first call with each new batch signature (tree,
    shapes, dtypes) checks the arguments on the host — the state's type, the
    leading step axis, and that both losses return scalars (by
    :func:`jax.eval_shape`, which traces but does not run them); later calls
    with the same signature skip the check, so stepping stays compile-once.
    Use ``@compiled`` or ``@compiled(check_batches=False)``.
    """
    if method is None:
        return functools.partial(compiled, check_batches=check_batches)
    jitted = jax.jit(method, static_argnums=0)

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if check_batches:
            self._check_call(*args[:3])
        return jitted(self, *args, **kwargs)
    wrapper.__wrapped_jit__ = jitted
    return wrapper


def _signature(tree: PyTree) -> Any:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((jnp.shape(x), jnp.result_type(x)) for x in leaves)


class BilevelOptimizer(abc.ABC):
    r"""Abstract base of every gradhpo algorithm.

    Subclasses are final: they implement :meth:`init`, :meth:`step` and
    :meth:`compute_hypergradient` and nothing else; shared machinery lives in
    :mod:`gradhpo.utils`.

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
        # Batch signatures already checked (a cache, not state).
        self._checked: set = set()

    # -- the contract ------------------------------------------------------

    @abc.abstractmethod
    def init(self, params: PyTree, hyperparams: PyTree) -> BilevelState:
        r"""Creates the initial state.

        Args:
          params: initial model parameters :math:`w_0`, any pytree of arrays.
          hyperparams: initial hyperparameters :math:`\lambda_0`, any pytree
            of arrays or numbers. Floating leaves are tuned; integer leaves
            are held fixed. Python floats are converted to arrays of the
            default floating dtype.

        Returns:
          A :class:`~gradhpo.BilevelState` with ``step == 0``, the inner
          optimizer state :math:`s_0` (built from ``inner_optimizer``
          at :math:`\lambda_0`), the outer optimizer state, and metadata
          initialised (losses NaN, ``nonfinite_count`` 0).

        Raises:
          TypeError: if a leaf of ``params`` is not a real floating array,
            or a leaf of ``hyperparams`` is not a real floating or integer
            array or number (booleans, complex numbers, ``None`` and strings
            are rejected; see :mod:`gradhpo.utils.validation`).
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
          never propagated: a non-finite inner gradient leaves ``params`` and
          ``inner_opt_state`` unchanged, a non-finite hypergradient leaves
          ``hyperparams`` and ``outer_opt_state`` unchanged, and each
          increments ``metadata["nonfinite_count"]``.

        The method is pure and compiled once per input shape; it can be
        wrapped in :func:`jax.jit` or :func:`jax.vmap` (a population of
        states stacked on a leading axis).
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

    # -- shared helpers for subclasses (not part of the public contract) ----

    def _check_call(self, state: BilevelState, train_batch: DataBatch = None,
                    val_batch: DataBatch = None) -> None:
        """Host-side checks of a call, once per batch signature.

        Every call checks the state's type (an ``isinstance``). The rest runs
        only for a new key (the batches' trees, shapes and dtypes, the state
        entries' names, and the signature of :meth:`_batch_template`): the
        leading step axis, that both losses return floating scalars (by
        :func:`jax.eval_shape`, which traces the losses but runs nothing) and
        the algorithm's :meth:`_check_state`. A repeated signature costs a
        few dictionary lookups and never traces the losses again.
        """
        if not isinstance(state, BilevelState):
            raise TypeError(
                "state must be a gradhpo.BilevelState (from "
                f"{type(self).__name__}.init), got {type(state).__name__}.")
        # keyed on the batches and the state's entry names only (a few
        # leaves): the state's shapes are fixed at init, and flattening a
        # large model per call would cost
        key = (_signature(train_batch), _signature(val_batch),
               tuple(sorted(state.metadata)), tuple(sorted(state.extra)),
               _signature(self._batch_template(state)))
        if key in self._checked:
            return
        self._check_state(state, train_batch, val_batch)
        train_one = _one_step_batch(train_batch, self._train_steps,
                                    "train_batch")
        val_one = _one_step_batch(val_batch, self._val_steps, "val_batch")
        self._check_loss("train_loss", self.train_loss, state.params,
                         state.hyperparams, train_one)
        self._check_loss("val_loss", self.val_loss, state.params,
                         state.hyperparams, val_one)
        self._checked.add(key)

    @staticmethod
    def _check_loss(name: str, loss: LossFn, params: PyTree,
                    hyperparams: PyTree, batch: DataBatch) -> None:
        """Checks ``loss`` returns a floating scalar, by shape evaluation."""
        val.check_scalar_loss(
            jax.eval_shape(loss, params, hyperparams, batch), name)

    def _batch_template(self, state: BilevelState) -> PyTree:
        """A part of the state the batches must keep matching (part of the
        check cache key); ``None`` by default. HyperDistill returns
        :math:`D^*`, allocated from the first batch."""
        del state
        return None

    def _check_state(self, state: BilevelState, train_batch: DataBatch,
                     val_batch: DataBatch) -> None:
        """Algorithm-specific checks of a call, once per signature: that the
        state was built by this algorithm's ``init`` and matches the
        batches. The base checks the common metadata entries."""
        del train_batch, val_batch
        self._require_entries(state, "metadata", ("nonfinite_count",))

    def _require_entries(self, state: BilevelState, field: str,
                         names: Any) -> None:
        """Raises :class:`ValueError` unless ``state.<field>`` has every
        entry of ``names`` (a state from another algorithm's ``init``)."""
        missing = [n for n in names if n not in getattr(state, field)]
        if missing:
            raise ValueError(
                f"state.{field} lacks {missing}: state was not built by "
                f"{type(self).__name__}.init with these options (it holds "
                f"{sorted(getattr(state, field))}); build it with "
                f"{type(self).__name__}.init.")

    def _initial_state(self, params: PyTree, hyperparams: PyTree,
                       metadata: Optional[Dict[str, Any]] = None,
                       extra: Optional[Dict[str, Any]] = None
                       ) -> BilevelState:
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
            extra=dict(extra or {}))

    def _init_inner_state(self, params: PyTree,
                          hyperparams: PyTree) -> PyTree:
        try:
            return gr.init_inner_state(self.inner_optimizer, params,
                                       hyperparams)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            if isinstance(self.inner_optimizer, optax.GradientTransformation):
                raise
            raise ValueError(
                "hyperparams do not match what inner_optimizer expects: "
                "building the inner optimizer from hyperparams raised "
                f"{type(e).__name__}: {e}. Pass every hyperparameter the "
                "callable reads (e.g. {'lr': 0.1} for lambda hp: "
                "optax.sgd(hp['lr'])).") from e

    def _finish_step(self, state: BilevelState, inner: gr.InnerStep,
                     hypergradient: PyTree, val_loss: jax.Array,
                     metadata: Optional[Dict[str, Any]] = None,
                     extra: Optional[Dict[str, Any]] = None,
                     outer: Optional[Callable] = None,
                     inner_skips: Optional[jax.Array] = None,
                     inner_guarded: bool = False
                     ) -> BilevelState:
        """Guards and applies an inner step and an outer update.

        Args:
          state: the state the step started from.
          inner: the (unguarded) inner step from ``state``; kept only if
            ``inner.finite``.
          hypergradient: skipped (hyperparameters and outer state kept) when
            non-finite.
          val_loss: recorded in the metadata.
          metadata, extra: algorithm-specific entries to record.
          outer: ``outer(state, hypergradient) -> (hyperparams,
            outer_opt_state, metadata)`` replacing the plain outer optimizer
            update (Greedy's masked, projected update); it only sees finite
            hypergradients.
          inner_skips: the number of skipped inner steps when ``inner``
            summarises several (default: 1 if ``inner`` is non-finite).
          inner_guarded: ``inner`` was already guarded inside its update
            (``guard=True`` in :mod:`gradhpo.utils.gradients`), which saves
            a pass over the weights and optimizer state.
        """
        if not inner_guarded:
            inner = gr.guard_inner_step(inner, state.params,
                                        state.inner_opt_state)
        # one reduction serves as the finiteness check and the norm; a
        # hypergradient through a skipped inner step is not applied either
        sq = tu.sum_squares(hypergradient)
        outer_ok = jnp.isfinite(sq) & inner.finite
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
        if inner_skips is None:
            inner_skips = jnp.logical_not(inner.finite).astype(jnp.int32)
        bad = inner_skips + jnp.logical_not(outer_ok).astype(jnp.int32)
        fdt = float_dtype()
        meta = dict(state.metadata)
        meta.update(
            train_loss=inner.loss.astype(fdt),
            val_loss=jnp.asarray(val_loss).astype(fdt),
            hypergradient_norm=jnp.sqrt(sq).astype(fdt),
            nonfinite_count=state.metadata["nonfinite_count"] + bad)
        meta.update({k: jnp.where(outer_ok, v, jnp.zeros_like(v))
                     for k, v in outer_meta.items()})
        meta.update(metadata or {})
        meta = {k: jnp.asarray(v).astype(jnp.result_type(state.metadata[k]))
                if k in state.metadata else v for k, v in meta.items()}
        new_extra = dict(state.extra)
        new_extra.update(extra or {})
        return state.replace(
            params=inner.params, inner_opt_state=inner.opt_state,
            hyperparams=new_hp, outer_opt_state=new_outer,
            step=state.step + 1, metadata=meta, extra=new_extra)


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
