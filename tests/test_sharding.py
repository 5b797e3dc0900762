"""A bilevel state sharded over devices (FSDP-style): ``gh.shard_state``.

The multi-device checks run in a subprocess with 4 or 8 fake CPU devices
(``--xla_force_host_platform_device_count``), in float64 so that the
sharded steps can be compared with the one-device steps to a tight
tolerance. The model is a small MLP with one L2 coefficient per weight;
its two weight matrices (and everything shaped like them) are sharded,
the biases are below ``min_size`` and replicated.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = textwrap.dedent(r"""
    import json, re, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    jax.config.update("jax_enable_x64", True)
    import gradhpo as gh

    n, names = int(sys.argv[1]), sys.argv[2].split(",")
    assert len(jax.devices()) == n, jax.devices()
    MIN_SIZE = 256

    def mlp(w, x):
        return jnp.tanh(x @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]

    def train_loss(w, hp, batch):
        x, y = batch
        l2 = sum(jnp.sum(jnp.exp(hp[k]) * w[k] ** 2) for k in w)
        return jnp.mean((mlp(w, x) - y) ** 2) + 0.5 * l2

    def val_loss(w, hp, batch):
        x, y = batch
        return jnp.mean((mlp(w, x) - y) ** 2)

    k = jax.random.split(jax.random.PRNGKey(0), 6)
    params = {"w1": 0.3 * jax.random.normal(k[0], (40, 64)),
              "b1": jnp.zeros(64),
              "w2": 0.3 * jax.random.normal(k[1], (64, 24)),
              "b2": jnp.zeros(24)}
    hyper = jax.tree.map(lambda p: jnp.full(p.shape, -4.0), params)
    batches = [(jax.random.normal(a, (16, 40)), jax.random.normal(b, (16, 24)))
               for a, b in ((k[2], k[3]), (k[4], k[5]))]
    large = {tuple(p.shape) for p in params.values() if p.size >= MIN_SIZE}
    smallest = min(int(np.prod(s)) for s in large)

    sgd = optax.sgd(0.1, momentum=0.9)
    algorithms = {
        "t1t2": lambda: gh.T1T2(train_loss, val_loss, sgd, optax.adam(0.02)),
        "greedy": lambda: gh.Greedy(train_loss, val_loss, sgd,
                                    optax.adam(0.02)),
        "hyperdistill": lambda: gh.HyperDistill(train_loss, val_loss, sgd,
                                                optax.adam(0.02)),
        "implicit": lambda: gh.Implicit(
            train_loss, val_loss, sgd, optax.adam(0.02), solver="neumann",
            terms=4, neumann_scale=0.1),
    }
    mesh = gh.make_mesh(axis_name="fsdp")
    dev0 = jax.devices()[0]

    def per_device_bytes(tree):
        return sum(s.data.nbytes for leaf in jax.tree.leaves(tree)
                   for s in leaf.addressable_shards if s.device == dev0)

    def gathers(hlo):
        # every result shape of every all-gather (combined ones are tuples)
        out = []
        for line in hlo.splitlines():
            if re.search(r"\ball-gather(-start)?\(", line) and "=" in line:
                lhs = line.split("=", 1)[1].split("all-gather", 1)[0]
                out += [[int(d) for d in m.split(",") if d]
                        for m in re.findall(r"\w+\[([\d,]*)\]", lhs)]
        return out

    report = {"n": n, "algorithms": {}}
    for name in names:
        opt = algorithms[name]()
        kw = {"batch": batches[0]} if name == "hyperdistill" else {}
        single = opt.init(params, hyper, **kw)
        # params and hyperparams sharded before init: the optimizer states
        # that init creates mirror them
        early = opt.init(gh.shard_state(params, mesh, min_size=MIN_SIZE),
                         gh.shard_state(hyper, mesh, min_size=MIN_SIZE), **kw)
        mirrored = []
        for like, states in ((early.params, early.inner_opt_state),
                             (early.hyperparams, early.outer_opt_state)):
            for state in states:
                for field in state:
                    if jax.tree.structure(field) != jax.tree.structure(like):
                        continue
                    mirrored += [a.sharding.is_equivalent_to(b.sharding,
                                                             a.ndim)
                                 for a, b in zip(jax.tree.leaves(field),
                                                 jax.tree.leaves(like))]
        state = gh.shard_state(single, mesh, min_size=MIN_SIZE)
        train, val = (gh.shard_batch(b, mesh, "fsdp") for b in batches)
        hlo = jax.jit(opt.step).lower(state, train, val).compile().as_text()
        start = state
        for _ in range(3):
            single = opt.step(single, *batches)
            state = opt.step(state, train, val)
        diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(state),
                                   jax.tree.leaves(single)))
        kept = [jax.tree_util.keystr(p) for (p, a), b in zip(
            jax.tree_util.tree_flatten_with_path(state)[0],
            jax.tree.leaves(start))
            if not a.sharding.is_equivalent_to(b.sharding, a.ndim)]
        big = [x for x in jax.tree.leaves(state)
               if x.size >= MIN_SIZE and len(x.sharding.device_set) == n
               and not x.sharding.is_fully_replicated]
        report["algorithms"][name] = dict(
            max_abs_diff=diff,
            scale=max(float(np.max(np.abs(np.asarray(x))))
                      for x in jax.tree.leaves(single)),
            finite=bool(all(np.all(np.isfinite(np.asarray(x)))
                            for x in jax.tree.leaves(state))),
            mirrored=mirrored, changed_shardings=kept,
            n_large=len([x for x in jax.tree.leaves(state)
                         if x.size >= MIN_SIZE]),
            n_sharded=len(big),
            large_bytes=sum(x.nbytes for x in big),
            large_bytes_per_device=per_device_bytes(big),
            total_bytes=sum(x.nbytes for x in jax.tree.leaves(state)),
            per_device_bytes=per_device_bytes(state),
            gathers=gathers(hlo), full_shapes=sorted(large),
            smallest_sharded=smallest,
            step_devices=len(state.step.sharding.device_set))

    # the rule, leaf by leaf
    key = jax.random.key(0)
    rule = gh.shard_state({"tie": jnp.ones((16, 16)), "odd": jnp.ones((6, 8)),
                           "none": jnp.ones((6, 6)), "small": jnp.ones(8),
                           "key": key, "num": 1.5},
                          mesh, min_size=20)
    report["rule"] = {k: [str(a) if a else None for a in v.sharding.spec]
                      if not v.sharding.is_fully_replicated else "replicated"
                      for k, v in rule.items()}
    print("REPORT" + json.dumps(report))
""")


#: devices -> algorithms checked there (T1-T2 on both)
RUNS = {4: "t1t2,greedy", 8: "t1t2,hyperdistill"}


def _start(n: int, names: str) -> subprocess.Popen:
    env = dict(os.environ)
    # fake CPU devices; a cheaper LLVM pipeline (the programs are tiny)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                        + f" --xla_force_host_platform_device_count={n}"
                        " --xla_backend_optimization_level=0")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    return subprocess.Popen([sys.executable, "-c", WORKER, str(n), names],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    line = [x for x in out.splitlines() if x.startswith("REPORT")]
    return json.loads(line[-1][len("REPORT"):])


@pytest.fixture(scope="module")
def workers():
    # both device counts at once (two processes, mostly compiling)
    procs = {n: _start(n, names) for n, names in RUNS.items()}
    results = {}
    yield lambda n: results.setdefault(n, _result(procs[n]))
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.fixture(params=sorted(RUNS))
def report(request, workers):
    return workers(request.param)


def test_sharded_steps_equal_one_device_steps(report):
    assert "t1t2" in report["algorithms"] and len(report["algorithms"]) > 1
    for name, r in report["algorithms"].items():
        assert r["finite"], name
        # float64: only the summation order differs
        assert r["max_abs_diff"] <= 1e-10 * max(1.0, r["scale"]), (name, r)


def test_large_leaves_are_split_evenly(report):
    n = report["n"]
    for name, r in report["algorithms"].items():
        # w1, w2, their L2 coefficients, momentum, Adam's moments (+ w* for
        # HyperDistill): every large leaf is sharded
        assert r["n_sharded"] == r["n_large"] >= 6, (name, r)
        assert r["large_bytes_per_device"] * n == r["large_bytes"], name
        # the rest (biases, scalars, metadata) is replicated and small
        assert (r["per_device_bytes"] - r["large_bytes"] // n
                == r["total_bytes"] - r["large_bytes"]), name
        assert r["per_device_bytes"] < r["total_bytes"] / 2, name
        assert r["step_devices"] == n, name


def test_compiled_step_gathers_no_weight(report):
    for name, r in report["algorithms"].items():
        full = [list(s) for s in r["full_shapes"]]
        assert full and r["gathers"] is not None
        # no all-gather rebuilds a sharded weight or hyperparameter (in its
        # shape or flattened); what is gathered are the batch and
        # activations, smaller than the smallest sharded leaf
        assert not [g for g in r["gathers"] if g in full], (name, r)
        assert all(int(np.prod(g)) < r["smallest_sharded"]
                   for g in r["gathers"]), (name, r["gathers"])


def test_step_keeps_shardings_and_init_mirrors_them(report):
    for name, r in report["algorithms"].items():
        assert r["changed_shardings"] == [], name
        # momentum and Adam's moments, built by init from sharded params
        # and hyperparams, are sharded like them
        assert r["mirrored"] and all(r["mirrored"]), (name, r["mirrored"])


def test_rule_largest_divisible_axis(report):
    rule = report["rule"]
    assert rule["tie"] == ["fsdp", None]          # the first of equal axes
    assert rule["odd"] == [None, "fsdp"]          # 6 is not divisible
    assert rule["none"] == "replicated"           # no divisible axis
    assert rule["small"] == "replicated"          # below min_size
    assert rule["key"] == "replicated"            # PRNG keys
    assert rule["num"] == "replicated"


def test_shard_state_one_device_and_arguments():
    mesh = gh.make_mesh(jax.devices()[:1], axis_name="m")
    tree = {"w": jnp.ones((8, 4)), "s": jnp.zeros(()), "i": 3}
    out = gh.shard_state(tree, mesh, min_size=0)
    assert out["w"].sharding.spec[0] == "m"
    assert out["s"].sharding.is_fully_replicated
    np.testing.assert_array_equal(out["w"], tree["w"])
    assert gh.shard_state(tree, mesh, "m")["w"].shape == (8, 4)
    with pytest.raises(TypeError, match="mesh must be"):
        gh.shard_state(tree, "mesh")
    with pytest.raises(ValueError, match="axis_name must be an axis"):
        gh.shard_state(tree, mesh, "batch")
    with pytest.raises(TypeError, match="axis_name must be a str"):
        gh.shard_state(tree, mesh, 0)
    with pytest.raises(TypeError, match="min_size must be an int"):
        gh.shard_state(tree, mesh, min_size=1.5)
    with pytest.raises(ValueError, match="min_size must be >= 0"):
        gh.shard_state(tree, mesh, min_size=-1)
    with pytest.raises(TypeError, match=r"tree\['x'\] must be an array"):
        gh.shard_state({"x": "text"}, mesh)
    two = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1),
                            ("a", "b"))
    with pytest.raises(ValueError, match="axis_name must name"):
        gh.shard_state(tree, two)
    out = gh.shard_state(tree, two, "b", min_size=0)
    assert out["w"].sharding.spec[0] == "b"


def test_sharded_state_steps_on_one_device():
    opt = gh.T1T2(lambda w, hp, b: jnp.sum((b @ w) ** 2) + hp * jnp.sum(w**2),
                  lambda w, hp, b: jnp.sum((b @ w - 1.0) ** 2),
                  optax.sgd(0.01), optax.adam(0.01))
    state = opt.init(jnp.ones((16, 8)), jnp.array(0.1))
    mesh = gh.make_mesh(jax.devices()[:1])
    sharded = gh.shard_state(state, mesh, min_size=1)
    batch = jnp.ones((4, 16))
    a, b = opt.step(state, batch, batch), opt.step(sharded, batch, batch)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
