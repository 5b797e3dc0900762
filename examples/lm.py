r"""A decoder-only transformer language model (Flax linen) and its losses.

Imported by ``examples/ohgw.py --task language`` and the tests; it has no
command line of its own.

**Model** (:class:`TransformerLM`): GPT-2's layout (Radford et al. 2019) —
token embeddings plus *learned* positional embeddings, ``depth`` pre-LayerNorm
blocks ``x + Attn(LN(x))``, ``x + MLP(LN(x))`` with causal multi-head
self-attention and a GELU MLP of width ``4 * width``, a final LayerNorm, and
the output logits from the token embedding matrix (tied weights). Weights
are initialised :math:`\mathcal N(0, 0.02^2)`, the residual output
projections :math:`\mathcal N(0, 0.02^2 / (2\,\text{depth}))`, as in GPT-2.
:data:`GPT2_SMALL` is the ``--full`` size (12 layers, width 768, 12 heads,
context 1024; 256 byte tokens instead of GPT-2's 50,257 BPE tokens, see
``examples/text_utils.py``); :data:`SMALL` and :data:`TINY` run on a CPU.

**Hyperparameters** :math:`\psi` (the hyperparameter pytree, in the
coordinates :class:`~gradhpo.integrations.optuna.OptunaWarmStart` hands
over):

- ``lr`` = :math:`\log \eta` and ``weight_decay`` = :math:`\log \lambda_{wd}`:
  AdamW (:math:`\beta = (0.9, 0.99)`, decoupled decay on the matrices only,
  not on biases, LayerNorm scales or embeddings) after clipping the
  gradient's global norm to 1 (:func:`inner_optimizer`, a callable
  ``hp -> optax transformation``, so both are differentiable);
- ``label_smoothing`` :math:`\epsilon`: the training loss is
  :math:`(1-\epsilon)\,\text{NLL} + \epsilon\,\overline{\text{NLL}}_{V}`, the
  cross-entropy against ``optax.smooth_labels`` targets, written without a
  one-hot array;
- ``embed_noise`` :math:`\sigma`: Gaussian noise added to the input
  representation :math:`x = E[t] + P` (token plus positional embedding),
  :math:`\tilde x = x + \sigma\,\mathrm{sg}(\mathrm{rms}(x))\,\xi` with
  :math:`\xi \sim \mathcal N(0, I)` drawn from the PRNG key carried in the
  training batch and :math:`\mathrm{sg}` a stop-gradient (the level is
  relative to the embeddings' scale, which starts at 0.02).

Embedding noise is used instead of dropout on purpose: it is differentiable
in :math:`\sigma` (:math:`\partial\tilde x/\partial\sigma = \mathrm{rms}(x)
\xi`), whereas a dropout rate enters through a Bernoulli mask and has no
useful pathwise gradient; and because :math:`\xi` comes from the key in the
batch, the training loss is a deterministic function of
``(params, hyperparams, batch)``, so the inner step and its
vector-Jacobian product in a hypergradient see the same noise
(ALGORITHMS.md §1.7). The validation loss has no noise and no smoothing.

**Batches**: ``{"tokens": int32 (B, T + 1), "key": uint32 (2,)}`` for the
training loss (inputs ``tokens[:, :-1]``, targets ``tokens[:, 1:]``);
the validation loss reads only ``"tokens"``. Losses have gradhpo's
signature ``loss(params, hyperparams, batch) -> scalar``.

**Perplexity** (:func:`perplexity`, :func:`nll_sum`): :math:`\exp` of the
mean natural-log negative log-likelihood over *all predicted tokens*
(summing per-token losses over every batch and dividing once by the number
of tokens — not an average of per-batch perplexities).
"""

if __name__ == "__main__":      # answer before importing JAX
    import cli
    cli.support_module_main(
        __doc__,
        "lm.py is a support module: the transformer LM that python "
        "examples/ohgw.py --task language tunes; it has nothing to "
        "run. See python examples/ohgw.py --help.")

import dataclasses
import math
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

#: Names of the continuous hyperparameters, in the order of the search space.
HYPERPARAMETERS = ("lr", "weight_decay", "label_smoothing", "embed_noise")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Sizes of a :class:`TransformerLM`.

    Attributes:
      vocab_size: number of token values (256 for byte tokens).
      context: :math:`T`, the longest input (learned positions).
      depth: number of transformer blocks.
      width: model width :math:`d` (embedding size).
      heads: attention heads (``width`` must be divisible by it).
      mlp_ratio: MLP width over ``width``.
    """
    vocab_size: int = 256
    context: int = 64
    depth: int = 2
    width: int = 64
    heads: int = 4
    mlp_ratio: int = 4

    def __post_init__(self):
        for name in ("vocab_size", "context", "depth", "width", "heads",
                     "mlp_ratio"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(
                    value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive integer; got "
                                 f"{value!r}.")
        if self.width % self.heads:
            raise ValueError(f"width must be divisible by heads; got width="
                             f"{self.width}, heads={self.heads}.")


#: GPT-2 small's shape (with byte tokens): the ``--full`` model.
GPT2_SMALL = LMConfig(context=1024, depth=12, width=768, heads=12)
#: The default CPU model of ``ohgw.py --task language``.
SMALL = LMConfig(context=64, depth=2, width=64, heads=4)
#: The ``--quick`` model.
TINY = LMConfig(context=32, depth=1, width=32, heads=2)

_INIT = nn.initializers.normal(0.02)


class Block(nn.Module):
    """One pre-LayerNorm block: causal self-attention, then a GELU MLP."""
    config: LMConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        out_init = nn.initializers.normal(0.02 / math.sqrt(2 * c.depth))
        causal = nn.make_causal_mask(jnp.ones(x.shape[:-1], jnp.int32))
        h = nn.LayerNorm()(x)
        x = x + nn.MultiHeadDotProductAttention(
            num_heads=c.heads, qkv_features=c.width, kernel_init=_INIT,
            out_kernel_init=out_init, deterministic=True)(h, mask=causal)
        h = nn.LayerNorm()(x)
        h = nn.gelu(nn.Dense(c.mlp_ratio * c.width, kernel_init=_INIT)(h))
        return x + nn.Dense(c.width, kernel_init=out_init)(h)


class TransformerLM(nn.Module):
    r"""Decoder-only transformer: tokens ``(..., T)`` -> logits
    ``(..., T, vocab_size)``; position :math:`t`'s logits depend only on
    tokens :math:`\le t`.

    ``noise_scale`` :math:`\sigma` and ``noise_key`` add the embedding noise
    :math:`\sigma\,\mathrm{sg}(\mathrm{rms}(x))\,\xi` of the module
    docstring (none when ``noise_key`` is None).

    Example:
      >>> model = TransformerLM(TINY)
      >>> tokens = jnp.zeros((2, 8), jnp.int32)
      >>> params = model.init(jax.random.PRNGKey(0), tokens)["params"]
      >>> model.apply({"params": params}, tokens).shape
      (2, 8, 256)
    """
    config: LMConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, noise_scale=0.0,
                 noise_key=None) -> jax.Array:
        c = self.config
        if tokens.shape[-1] > c.context:
            raise ValueError(f"the input has {tokens.shape[-1]} tokens, more "
                             f"than the context {c.context}.")
        embed = nn.Embed(c.vocab_size, c.width, embedding_init=_INIT)
        positions = self.param("positions", nn.initializers.normal(0.01),
                               (c.context, c.width))
        x = embed(tokens) + positions[:tokens.shape[-1]]
        if noise_key is not None:
            # level relative to the embeddings' scale; the scale itself is a
            # constant for the gradient, so d x~ / d sigma = rms(x) xi
            rms = lax.stop_gradient(jnp.sqrt(jnp.mean(x * x)))
            x = x + noise_scale * rms * jax.random.normal(noise_key, x.shape,
                                                          x.dtype)
        for _ in range(c.depth):
            x = Block(c)(x)
        return embed.attend(nn.LayerNorm()(x))


def init_params(config: LMConfig, seed: int):
    """Initial parameters :math:`w_0` of a :class:`TransformerLM`."""
    tokens = jnp.zeros((1, config.context), jnp.int32)
    return TransformerLM(config).init(jax.random.PRNGKey(seed),
                                      tokens)["params"]


def decay_mask(params):
    """True on the matrices (kernels), False on biases, LayerNorm scales
    and the embeddings (GPT-2's decay groups)."""
    def leaf(path, x):
        names = [getattr(p, "key", "") for p in path]
        return x.ndim >= 2 and "embedding" not in names and \
            "positions" not in names
    return jax.tree_util.tree_map_with_path(leaf, params)


#: AdamW's ``eps_root``: :math:`\sqrt{\hat v + \epsilon_{root}}`. Without
#: it the warm-start hypergradients of label smoothing and embedding noise
#: (a VJP through the Adam step) came out NaN for this model in float32:
#: :math:`d\sqrt v/dv` is infinite at :math:`v = 0`. With it they are
#: finite; the step itself changes by a negligible amount.
EPS_ROOT = 1e-16


def inner_optimizer(clip: float = 1.0):
    r"""``hp -> optax`` transformation: clip the global norm at ``clip``,
    then AdamW with :math:`\eta = e^{hp[lr]}`, :math:`\beta = (0.9,
    0.99)`, ``eps_root`` :data:`EPS_ROOT` (finite derivatives through the
    step) and decoupled decay :math:`e^{hp[weight\_decay]}` on
    :func:`decay_mask`."""
    def make(hp):
        return optax.chain(
            optax.clip_by_global_norm(clip),
            optax.adamw(jnp.exp(hp["lr"]), b1=0.9, b2=0.99,
                        eps_root=EPS_ROOT,
                        weight_decay=jnp.exp(hp["weight_decay"]),
                        mask=decay_mask))
    return make


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token natural-log NLL :math:`-\\log p(y_t)`, shape of targets."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets)


def smoothed_nll(logits: jax.Array, targets: jax.Array,
                 smoothing) -> jax.Array:
    r"""Mean of :math:`(1-\epsilon)(-\log p_y) + \epsilon\,\frac1V\sum_v
    (-\log p_v)`: the cross-entropy against
    ``optax.smooth_labels(one_hot(y), epsilon)`` without the one-hot.

    Example:
      >>> logits = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
      >>> y = jnp.array([0])
      >>> ref = optax.softmax_cross_entropy(
      ...     logits, optax.smooth_labels(jax.nn.one_hot(y, 3), 0.3)).mean()
      >>> bool(jnp.allclose(smoothed_nll(logits, y, 0.3), ref))
      True
    """
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
    uniform = -jnp.mean(logp, -1)
    return jnp.mean((1 - smoothing) * nll + smoothing * uniform)


def make_losses(config: LMConfig):
    """``(train_loss, val_loss, logits)`` of a :class:`TransformerLM`.

    ``train_loss(params, hp, batch)``: smoothed NLL with embedding noise
    (``hp["label_smoothing"]``, ``hp["embed_noise"]``, ``batch["key"]``);
    ``val_loss(params, hp, batch)``: the plain mean NLL (``hp`` unused);
    ``logits(params, tokens)``.
    """
    model = TransformerLM(config)

    def logits(params, tokens, noise_scale=0.0, noise_key=None):
        return model.apply({"params": params}, tokens, noise_scale,
                           noise_key)

    def train_loss(params, hp, batch):
        tokens = batch["tokens"]
        out = logits(params, tokens[..., :-1], hp["embed_noise"],
                     batch["key"])
        return smoothed_nll(out, tokens[..., 1:], hp["label_smoothing"])

    def val_loss(params, hp, batch):
        del hp
        tokens = batch["tokens"]
        return jnp.mean(token_nll(logits(params, tokens[..., :-1]),
                                  tokens[..., 1:]))

    return train_loss, val_loss, logits


def perplexity(logits: jax.Array, targets: jax.Array,
               mask=None) -> jax.Array:
    r""":math:`\exp\big(\sum_t m_t(-\log p(y_t)) / \sum_t m_t\big)`, the
    perplexity of the predicted (``mask``-ed in) tokens.

    Example:
      >>> logits = jnp.zeros((1, 3, 256))        # uniform prediction
      >>> round(float(perplexity(logits, jnp.array([[1, 2, 3]]))), 3)
      256.0
    """
    nll = token_nll(logits, targets)
    mask = jnp.ones_like(nll) if mask is None else mask.astype(nll.dtype)
    return jnp.exp(jnp.sum(nll * mask) / jnp.sum(mask))


def make_nll_sum(config: LMConfig):
    """A jitted ``(params, windows, mask) -> (sum of NLL, token count)`` over
    batches of evaluation windows (``windows`` ``(M, B, T + 1)``, ``mask``
    ``(M, B, T)``, from :func:`text_utils.eval_windows`); a ``lax.scan``
    over the ``M`` batches."""
    _, _, logits = make_losses(config)

    @jax.jit
    def nll_sum(params, windows, mask):
        def body(total, batch):
            w, m = batch
            nll = token_nll(logits(params, w[:, :-1]), w[:, 1:])
            return total + jnp.sum(nll * m), None
        total, _ = lax.scan(body, jnp.zeros((), jnp.float32),
                            (windows, mask))
        return total, jnp.sum(mask)
    return nll_sum


#: Perplexity reported for a diverged model (non-finite or larger losses).
PPL_CAP = 1e4


def corpus_perplexity(nll_sum, params, windows, mask) -> float:
    """Perplexity of a whole split (float, capped at :data:`PPL_CAP`).

    Args:
      nll_sum: from :func:`make_nll_sum`.
      params: the model's parameters.
      windows, mask: :func:`text_utils.eval_windows` of the split.
    """
    total, count = jax.device_get(nll_sum(params, windows, mask))
    mean = float(total) / float(count)
    if not math.isfinite(mean):
        return PPL_CAP
    return math.exp(min(mean, math.log(PPL_CAP)))


def parameter_count(params) -> int:
    """Number of scalars in ``params``."""
    return int(sum(np.size(x) for x in jax.tree.leaves(params)))
