"""Small bilevel problems with closed-form answers (ALGORITHMS.md §6)."""

import jax
import jax.numpy as jnp
import optax


# -- T1 ridge regression -----------------------------------------------------
RIDGE_X = [[1., 2.], [3., 4.], [5., 6.]]
RIDGE_Y = [1., 2., 2.]
RIDGE_XV = [[1., 0.], [1., 1.]]
RIDGE_YV = [0.5, 1.]


def ridge_batches():
    return ((jnp.array(RIDGE_X), jnp.array(RIDGE_Y)),
            (jnp.array(RIDGE_XV), jnp.array(RIDGE_YV)))


def ridge_train_loss(w, lam, batch):
    x, y = batch
    return 0.5 * jnp.sum((x @ w - y) ** 2) + 0.5 * lam * jnp.sum(w ** 2)


def ridge_val_loss(w, lam, batch):
    del lam
    x, y = batch
    return 0.5 * jnp.sum((x @ w - y) ** 2)


def log_ridge_train_loss(w, hp, batch):
    return ridge_train_loss(w, jnp.exp(hp["log_l2"]), batch)


# -- T2 quadratic --------------------------------------------------------------
QUAD_H = jnp.array([2., 1.])
QUAD_B = jnp.array([1., 1.])
QUAD_C = jnp.array([0.5, 0.5])


def quad_train_loss(w, lam, batch):
    del batch
    return (0.5 * jnp.sum(QUAD_H * w ** 2) - jnp.sum(QUAD_B * w)
            + 0.5 * jnp.sum(lam * w ** 2))


def quad_val_loss(w, lam, batch):
    del lam, batch
    return 0.5 * jnp.sum((w - QUAD_C) ** 2)


# -- an MLP with per-layer L2 and a hyperparameter in the validation loss ----

def init_mlp(key, sizes=(5, 8, 3)):
    keys = jax.random.split(key, len(sizes) - 1)
    return [{"w": jax.random.normal(k, (m, n)) / jnp.sqrt(m),
             "b": jnp.zeros(n)} for k, m, n in zip(keys, sizes, sizes[1:])]


def mlp_logits(params, x):
    for layer in params[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ params[-1]["w"] + params[-1]["b"]


def mlp_train_loss(params, hp, batch):
    x, y = batch
    labels = optax.smooth_labels(jax.nn.one_hot(y, 3),
                                 jax.nn.sigmoid(hp["smooth_logit"]))
    ce = optax.softmax_cross_entropy(mlp_logits(params, x), labels).mean()
    l2 = sum(jnp.exp(r) * jnp.sum(layer["w"] ** 2)
             for r, layer in zip(hp["log_l2"], params))
    return ce + 0.5 * l2


def mlp_val_loss(params, hp, batch):
    x, y = batch
    ce = optax.softmax_cross_entropy_with_integer_labels(
        mlp_logits(params, x), y).mean()
    # a direct term, so the hypergradient must include dL_val/dlambda
    return ce + 0.01 * hp["smooth_logit"] ** 2


def mlp_hyperparams(dtype=jnp.float32):
    return {"log_l2": [jnp.array(-3.0, dtype), jnp.array(-2.0, dtype)],
            "smooth_logit": jnp.array(-2.0, dtype)}


def mlp_batch(key, n=16):
    kx, ky = jax.random.split(key)
    x = jax.random.normal(kx, (n, 5))
    y = jax.random.randint(ky, (n,), 0, 3)
    return x, y
