"""Populations (vmap) and data-parallel steps over several devices."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import optax
import pytest

import gradhpo as gh
from gradhpo.utils import parallel

import problems as pb


def test_init_population_stacks_and_matches_single_inits(key):
    opt = gh.T1T2(pb.mlp_train_loss, pb.mlp_val_loss, optax.adam(1e-2),
                  optax.adam(1e-2))
    params = pb.init_mlp(key)
    settings = [pb.mlp_hyperparams(), jax.tree.map(
        lambda x: x + 1.0, pb.mlp_hyperparams())]
    states = gh.init_population(opt, params, settings)
    assert states.step.shape == (2,)
    singles = parallel.unstack(states)
    for single, hp in zip(singles, settings):
        chex.assert_trees_all_equal(single, opt.init(params, hp))
    with pytest.raises(ValueError, match="at least one setting"):
        gh.init_population(opt, params, [])
    with pytest.raises(ValueError, match="non-empty"):
        parallel.stack([])
    assert parallel.unstack({}) == []


def test_shard_batch_rejects_indivisible_batches():
    mesh = gh.make_mesh(jax.devices()[:1])
    with pytest.raises(ValueError, match="axis 1 divisible"):
        gh.shard_batch(jnp.ones(3), mesh, axis=1)


SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import gradhpo as gh
    import problems as pb
    assert len(jax.devices()) == 4, jax.devices()
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    opt = gh.T1T2(pb.mlp_train_loss, pb.mlp_val_loss,
                  optax.sgd(0.1, momentum=0.9), optax.adam(0.05))
    state = opt.init(pb.init_mlp(k1), pb.mlp_hyperparams(jnp.float64))
    train, val = pb.mlp_batch(k2, 16), pb.mlp_batch(k3, 16)
    single = state
    for _ in range(3):
        single = opt.step(single, train, val)
    mesh = gh.make_mesh()
    sharded = gh.replicate(state, mesh)
    strain, sval = gh.shard_batch(train, mesh), gh.shard_batch(val, mesh)
    assert len(strain[0].sharding.device_set) == 4
    for _ in range(3):
        sharded = opt.step(sharded, strain, sval)
    assert len(sharded.params[0]["w"].sharding.device_set) == 4
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                   rtol=1e-10, atol=1e-12)
    print("data-parallel OK")
""")


def test_data_parallel_step_equals_single_device(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + " --xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(__file__), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "data-parallel OK" in out.stdout
