r"""Time and peak memory of one hyper-step from 10^3 to 10^8 hyperparameters.

One L2 coefficient per weight of a wide linear regression model, so the
number of hyperparameters :math:`H` equals the number of parameters
:math:`P` (no biases):

.. math::

   L_{tr}(W, \rho; D) = \frac{1}{2B} \sum_{b} \lVert x_b W - y_b \rVert^2
       + \tfrac12 \sum_{ij} e^{\rho_{ij}} W_{ij}^2, \qquad
   L_{val}(W; V) = \frac{1}{2B} \sum_{b} \lVert x_b W - y_b \rVert^2,

with :math:`W \in \mathbb{R}^{1000 \times n/1000}` (``--inputs`` rows), so
sizes :math:`n = 10^3, 10^4, \dots, 10^8` give 1 to 100,000 outputs; the
batch (``--batch``, 32 examples) is synthetic and float32. The inner optimizer
is SGD with heavy-ball momentum 0.9, the outer optimizer Adam on
:math:`\rho` (as in ``step_cost.py``).

Rows: ``T1T2(hypergradient="exact")``, ``T1T2(hypergradient=
"finite_difference")`` and ``HyperDistill``, each with and without buffer
donation (``jax.jit(opt.step, donate_argnums=0)``; HyperDistill's initial
:math:`w^*` aliases the parameters, so it is copied once before donating).

Every (algorithm, donation, size) runs in a fresh subprocess, which builds the
problem, compiles the step ahead of time, takes one untimed step, then times
steps until it has ``--steps`` of them and at least ``--min-seconds`` (at most
100) and reports their median. Peak resident memory is ``VmHWM`` of
``/proc/self/status`` (the same as ``getrusage(RUSAGE_SELF).ru_maxrss``),
taken over the whole process (initialisation, compilation and steps), minus
the peak of a baseline process that imported jax and gradhpo and ran one
scalar operation. Bytes per hyperparameter are that net peak over :math:`H`.

Memory model (float32, :data:`MODEL`): the state holds :math:`w`, the
momentum trace (2 P), :math:`\lambda` and Adam's two moments (3 H), plus
:math:`w^*` (1 P) for HyperDistill. A step writes a new state while the old
one is alive (the caller holds it; with donation, XLA on CPU still computes
the new state into temporaries, because the hypergradient and the
non-finite guards read the old :math:`w` and :math:`\lambda` after the new
ones exist), so the peak is two states plus the temporaries that XLA could
not place in output buffers not yet written:

.. math::

   \text{peak} \approx 4\,(a P + b H) + \text{batches} + c,\quad
   (a, b) = (4, 6)\ \text{exact},\ (5, 6)\ \text{finite difference},\
   (7, 6)\ \text{HyperDistill},

where :math:`c` is the size-independent part (the compiled program, the
runtime's buffers), measured as the net peak at the smallest size. The
script prints predicted against measured peaks and what an 80 GB
accelerator would hold according to the model. See
``docs/memory_model.rst``.

Time: the least-squares slope of :math:`\log t` against :math:`\log n` over
the sizes :math:`\ge` ``--fit-min`` (10^5; below it a step is dominated by
dispatch) is printed and stored, with the slope over all sizes.

Sharded rows (``--devices N``, N >= 2): every worker then runs with ``N``
fake CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``,
set in its own environment), shards the state after ``init`` with
:func:`gradhpo.shard_state` (each weight, L2 coefficient and optimizer
moment split along its largest divisible axis, scalars replicated), keeps
the batches replicated, and records the state bytes one device holds
(``state_bytes_per_device``, the sum of the shards on the first device)
and the number of all-gathers in the compiled step whose result has the
full shape of a sharded leaf (``hlo_full_gathers``, expected 0). Every row
carries a ``devices`` field (1 without sharding). The fake devices share
one process, so the peak resident memory and the times of these rows are
those of all devices together: compare their per-device bytes, not their
peaks, with the one-device rows.

Low-memory configurations (up to 10^9, see ``docs/memory_model.rst``):
``--hyper-dtype bfloat16`` stores rho (and the outer optimizer's moments)
in bfloat16, the parameters staying float32 (lambda = exp(rho) is then
materialised once in bfloat16 inside the loss, or XLA would keep it in
float32); ``--inner sgd`` is stateless ``sgd(0.02)`` (0.05 without momentum
diverges on this problem); ``--outer sgd`` is plain SGD without moments
(``--outer-lr``, default 1e5); ``--algorithms greedy`` adds ``Greedy`` with
horizon 1. Rows carry ``param_dtype``, ``hyper_dtype``, ``inner``,
``outer`` and ``devices``; their names append ``_sgd_sgd`` and ``_bf16``.
``--compare-steps N`` runs N steps at ``--compare-size`` (10^6) with
float32 and with bfloat16 hyperparameters from the same rho0 and reports
how far they end apart; ``--plot`` writes bytes per hyperparameter and time
per step against size; ``--merge-into`` replaces this run's rows (same
name and size) in an existing report and keeps everything else.

Example:
  python benchmarks/scaling.py --out benchmarks/results/scaling.json
  python benchmarks/scaling.py --quick            # 1e3..1e5, 2 steps
  python benchmarks/scaling.py --max-size 1e7 --algorithms t1t2_exact
  python benchmarks/scaling.py --devices 4 --min-size 1e6 --max-size 1e6 \\
      --algorithms t1t2_exact --donate off --out /tmp/scaling_4dev.json
  python benchmarks/scaling.py --max-size 1e9 --algorithms t1t2_exact,greedy \\
      --donate on --hyper-dtype bfloat16 --inner sgd --outer sgd \\
      --steps 2 --min-seconds 0 --compare-steps 20 --plot /tmp/s.png \\
      --out /tmp/scaling_1e9.json --merge-into benchmarks/results/scaling.json
"""

import argparse
import datetime
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as cm  # noqa: E402
else:  # pragma: no cover -- imported as benchmarks.scaling
    from benchmarks import _common as cm

ALGORITHMS = ("t1t2_exact", "t1t2_fd", "hyperdistill")  # the default set
#: every algorithm ``--algorithms`` accepts (greedy: ``gh.Greedy`` with
#: horizon 1, the T1-T2 term through the generalized greedy code path)
KNOWN = ALGORITHMS + ("greedy",)
MARKER = "SCALING_RESULT "
ITEMSIZE = 4  # float32
#: bytes of one number of each dtype ``--hyper-dtype`` accepts
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
#: parameter-sized buffers of each inner optimizer's state, and
#: hyperparameter-sized buffers of each outer optimizer's state
INNER_BUFFERS = {"momentum": 1, "sgd": 0}
OUTER_BUFFERS = {"adam": 2, "sgd": 0}
DEFAULT_OUTER_LR = {"adam": 1e-2, "sgd": 1e5}

#: Copies of P (parameters) and H (hyperparameters) per algorithm, with SGD
#: + momentum inside and Adam outside. ``state_*``: what the state keeps
#: between steps; ``temp_*``: step temporaries XLA could not place in an
#: output buffer (its buffer assignment, checked with XLA_FLAGS=
#: --xla_dump_to). Peak = 2 states + temporaries.
MODEL: Dict[str, Dict[str, Any]] = {
    "t1t2_exact": {
        "state_P": 2, "state_H": 3, "temp_P": 0, "temp_H": 0,
        "state": "w, momentum trace (2P); lambda, Adam mu, nu (3H)",
        "temporaries": "inner data gradient X^T r, exp(rho), validation "
                       "gradient v and hypergradient B^T v all live in "
                       "output buffers not yet written (0 extra)",
    },
    "t1t2_fd": {
        "state_P": 2, "state_H": 3, "temp_P": 1, "temp_H": 0,
        "state": "w, momentum trace (2P); lambda, Adam mu, nu (3H)",
        "temporaries": "the validation gradient v must outlive every "
                       "output buffer (it scales both w +- eps u): 1P",
    },
    "hyperdistill": {
        "state_P": 3, "state_H": 3, "temp_P": 1, "temp_H": 0,
        "state": "w, momentum trace, w* (3P); lambda, Adam mu, nu (3H); "
                 "D* (a batch)",
        "temporaries": "alpha (the validation gradient at the new w) "
                       "must outlive the new w* and the VJP at w*: 1P",
    },
    "greedy": {
        "state_P": 2, "state_H": 3, "temp_P": 1, "temp_H": 0,
        "state": "w, momentum trace (2P); lambda, Adam mu, nu (3H)",
        "temporaries": "the zero-initialised accumulator G and the "
                       "validation gradient: 1P more than T1-T2",
    },
}

#: Temporaries (P-sized, H-sized) of the other configurations, keyed by
#: (algorithm, inner, outer, hyperparameter dtype), from XLA's buffer
#: assignment at 1e7 (``XLA_FLAGS=--xla_dump_to``, CPU, jax 0.10.2). With
#: plain SGD outside there is no H-sized float32 output buffer left for the
#: validation gradient v, and with bfloat16 hyperparameters none of the
#: (half as large) H-sized outputs can hold it: v then costs 1P.
TEMPS: Dict[tuple, tuple] = {}
for _h in DTYPE_BYTES:
    TEMPS.update({("t1t2_exact", "sgd", "sgd", _h): (1, 0),
                  ("t1t2_fd", "sgd", "sgd", _h): (2, 0),
                  ("greedy", "sgd", "sgd", _h): (
                      (2, 0) if _h == "float32" else (1, 0)),
                  ("hyperdistill", "sgd", "sgd", _h): (
                      (2, 0) if _h == "float32" else (1, 0))})
TEMPS.update({("t1t2_exact", "momentum", "adam", "bfloat16"): (1, 0),
              ("t1t2_fd", "momentum", "adam", "bfloat16"): (2, 0),
              ("greedy", "momentum", "adam", "bfloat16"): (1, 0),
              ("hyperdistill", "momentum", "adam", "bfloat16"): (1, 0)})
#: Donated configurations where XLA writes the new state into the donated
#: buffers (one state at the peak, not two): HyperDistill with SGD inside
#: and outside and bfloat16 hyperparameters keeps a copy of the old w (1P),
#: lambda = exp(rho) (1H) and a boolean finiteness mask (1 byte per P).
DONATED: Dict[tuple, Dict[str, int]] = {
    ("hyperdistill", "sgd", "sgd", "bfloat16"): {
        "copies": 1, "temp_P": 1, "temp_H": 1, "mask_P": 1},
}


def coefficients(alg: str) -> Dict[str, int]:
    """``a`` and ``b`` of ``peak = itemsize * (a P + b H) + ...``."""
    m = MODEL[alg]
    return {"a": 2 * m["state_P"] + m["temp_P"],
            "b": 2 * m["state_H"] + m["temp_H"]}


def model_for(alg: str, inner: str = "momentum", outer: str = "adam",
              hyper_dtype: str = "float32", donate: bool = False
              ) -> Dict[str, Any]:
    """The memory model of one configuration (float32 parameters).

    ``peak = copies * state + temporaries + batches + c`` with ``state =
    s_P state_P P + s_H state_H H`` and ``temporaries = s_P temp_P P +
    s_H temp_H H + mask_P P``; ``a`` and ``b`` count the P- and H-sized
    buffers (``peak = s_P a P + s_H b H + mask_P P + ...``).
    """
    hbytes = DTYPE_BYTES[hyper_dtype]
    key = (alg, inner, outer, hyper_dtype)
    default = (inner, outer, hyper_dtype) == ("momentum", "adam", "float32")
    if default:
        m = dict(MODEL[alg])
    else:
        state_P = 1 + INNER_BUFFERS[inner] + (alg == "hyperdistill")
        state_H = 1 + OUTER_BUFFERS[outer]
        temp_P, temp_H = TEMPS.get(key, (MODEL[alg]["temp_P"] + (
            hbytes < ITEMSIZE), MODEL[alg]["temp_H"]))
        m = {"state_P": state_P, "state_H": state_H, "temp_P": temp_P,
             "temp_H": temp_H, "checked_with_xla": key in TEMPS,
             "state": f"w{', w*' if alg == 'hyperdistill' else ''}"
                      f"{', momentum trace' if inner == 'momentum' else ''}"
                      f" ({state_P}P, float32); lambda"
                      f"{', Adam mu, nu' if outer == 'adam' else ''} "
                      f"({state_H}H, {hyper_dtype})",
             "temporaries": f"{temp_P}P + {temp_H}H (XLA buffer "
                            "assignment)"}
    m.update(copies=2, mask_P=0)
    if donate and key in DONATED:
        m.update(DONATED[key])
        m["temporaries"] = (f"donated: the new state is written in place; "
                            f"{m['temp_P']}P (old w) + {m['temp_H']}H "
                            f"(exp(rho)) + {m['mask_P']} byte per P (mask)")
    m.update(a=m["copies"] * m["state_P"] + m["temp_P"],
             b=m["copies"] * m["state_H"] + m["temp_H"],
             param_itemsize=ITEMSIZE, hyper_itemsize=hbytes,
             itemsize=ITEMSIZE, hyper_dtype=hyper_dtype,
             param_dtype="float32", inner=inner, outer=outer,
             donate=bool(donate and key in DONATED))
    m["bytes_per_hyperparam"] = (ITEMSIZE * m["a"] + hbytes * m["b"]
                                 + m["mask_P"])
    return m


def predicted_variable(alg: str, n_params: int, n_hyper: int,
                       other_bytes: int = 0, **config: Any) -> int:
    """The size-dependent part of the predicted peak, in bytes
    (``config``: the keyword arguments of :func:`model_for`)."""
    m = model_for(alg, **config)
    return (ITEMSIZE * m["a"] * n_params + m["mask_P"] * n_params
            + m["hyper_itemsize"] * m["b"] * n_hyper + other_bytes)


def config_name(alg: str, donate: bool, inner: str = "momentum",
                outer: str = "adam", hyper_dtype: str = "float32",
                devices: int = 1) -> str:
    """The row name: ``t1t2_exact``, ``..._donated``, ``..._sgd_sgd_bf16``,
    ``..._4dev``."""
    parts = [alg] + ["donated"] * bool(donate)
    if (inner, outer) != ("momentum", "adam"):
        parts += [inner, outer]
    parts += ["bf16"] * (hyper_dtype == "bfloat16")
    parts += [f"{devices}dev"] * (devices > 1)
    return "_".join(parts)


# --------------------------------------------------------------------------
# Worker: one (algorithm, donation, size) in this process.


def _problem(size: int, inputs: int, batch: int,
             hyper_dtype: str = "float32"):
    import jax
    import jax.numpy as jnp
    import numpy as np

    if size % inputs:
        raise ValueError(f"size {size} is not a multiple of --inputs "
                         f"{inputs}")
    outputs = size // inputs

    def val_loss(w, rho, data):
        del rho  # the validation loss does not depend on the penalty
        x, y = data
        return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, axis=-1))

    def train_loss(w, rho, data):
        return (val_loss(w, rho, data)
                + 0.5 * jnp.sum(jnp.exp(rho) * w ** 2))

    def train_loss_low(w, rho, data):
        # lambda = exp(rho) materialised once, in rho's dtype: otherwise
        # XLA fuses the conversion to float32 into the exponential and
        # keeps a float32 lambda between its uses (4 bytes per
        # hyperparameter, instead of 2)
        lam = jax.lax.optimization_barrier(jnp.exp(rho))
        return val_loss(w, rho, data) + 0.5 * jnp.sum(lam * w ** 2)

    k = jax.random.split(jax.random.PRNGKey(0), 5)
    # one fused program: no float32 copy of w besides the random bits
    w = jax.jit(lambda key: jax.random.normal(key, (inputs, outputs))
                * np.sqrt(1.0 / inputs))(k[0])
    rho = jnp.full((inputs, outputs), np.log(1e-4), jnp.dtype(hyper_dtype))
    train = (jax.random.normal(k[1], (batch, inputs)),
             jax.random.normal(k[2], (batch, outputs)))
    val = (jax.random.normal(k[3], (batch, inputs)),
           jax.random.normal(k[4], (batch, outputs)))
    loss = train_loss if hyper_dtype == "float32" else train_loss_low
    return loss, val_loss, w, rho, train, val


def _optimizer(alg, train_loss, val_loss, inner="momentum", outer="adam",
               outer_lr=None):
    import optax
    inner = (optax.sgd(0.05, momentum=0.9) if inner == "momentum"
             else optax.sgd(0.02))
    lr = DEFAULT_OUTER_LR[outer] if outer_lr is None else outer_lr
    outer = optax.adam(lr) if outer == "adam" else optax.sgd(lr)
    if alg == "hyperdistill":
        from gradhpo.algorithms.online import HyperDistill
        return HyperDistill(train_loss, val_loss, inner, outer, gamma=0.9,
                            theta=1.0)
    if alg == "greedy":
        from gradhpo.algorithms.greedy import Greedy
        return Greedy(train_loss, val_loss, inner, outer, horizon=1)
    from gradhpo.algorithms.t1_t2 import T1T2
    mode = "exact" if alg == "t1t2_exact" else "finite_difference"
    return T1T2(train_loss, val_loss, inner, outer, hypergradient=mode)


def _nbytes(tree) -> int:
    import jax
    return int(sum(x.nbytes for x in jax.tree.leaves(tree)))


def _shard(state, train, val, devices: int) -> tuple:
    """The state sharded over ``devices`` (the batches replicated), the
    shardings to keep, and the state bytes on the first device."""
    import jax

    import gradhpo as gh
    if len(jax.devices()) != devices:
        raise RuntimeError(f"expected {devices} devices, got "
                           f"{len(jax.devices())} (XLA_FLAGS not applied?)")
    mesh = gh.make_mesh(axis_name="fsdp")
    state = jax.block_until_ready(gh.shard_state(state, mesh))
    train, val = gh.replicate((train, val), mesh)
    first = jax.devices()[0]
    per_device = sum(s.data.nbytes for x in jax.tree.leaves(state)
                     for s in x.addressable_shards if s.device == first)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return state, train, val, shardings, int(per_device)


def _full_gathers(hlo: str, shapes) -> int:
    """All-gathers in ``hlo`` whose result has one of ``shapes``."""
    import re
    count = 0
    for line in hlo.splitlines():
        if re.search(r"\ball-gather(-start)?\(", line) and "=" in line:
            lhs = line.split("=", 1)[1].split("all-gather", 1)[0]
            count += sum(tuple(int(d) for d in m.split(",") if d) in shapes
                         for m in re.findall(r"\w+\[([\d,]*)\]", lhs))
    return count


def run_worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Measures one configuration in this (fresh) process."""
    import jax
    import jax.numpy as jnp
    import optax  # noqa: F401 -- imported by the baseline too

    import gradhpo.algorithms.greedy  # noqa: F401
    import gradhpo.algorithms.online  # noqa: F401
    import gradhpo.algorithms.t1_t2  # noqa: F401

    alg = spec["alg"]
    if alg == "baseline":
        jax.block_until_ready(jnp.zeros(()) + 1)
        return {"alg": alg, "peak_bytes": cm.peak_rss_bytes(),
                "rss_bytes": cm.proc_status_bytes("VmRSS")}
    if alg == "compare":
        return compare_dtypes(spec)

    size, donate = int(spec["size"]), bool(spec["donate"])
    config = {k: spec.get(k, d) for k, d in (
        ("inner", "momentum"), ("outer", "adam"),
        ("hyper_dtype", "float32"))}
    start = time.perf_counter()
    train_loss, val_loss, w, rho, train, val = _problem(
        size, spec["inputs"], spec["batch"], config["hyper_dtype"])
    opt = _optimizer(alg, train_loss, val_loss, config["inner"],
                     config["outer"], spec.get("outer_lr"))
    if alg == "hyperdistill":
        state = opt.init(w, rho, batch=train)   # w* is its own buffer
    else:
        state = opt.init(w, rho)
    del w, rho
    jax.block_until_ready(state)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    n_hyper = sum(x.size for x in jax.tree.leaves(state.hyperparams))
    m = model_for(alg, donate=donate, **config)
    state_bytes = _nbytes(state)  # counts w* even while it aliases w
    batch_bytes = _nbytes(train) + _nbytes(val)
    # state entries that are not P or H (metadata, D*, keys), once per
    # state copy (old and new), and the batches
    state_other = state_bytes - (ITEMSIZE * m["state_P"] * n_params
                                 + m["hyper_itemsize"] * m["state_H"]
                                 * n_hyper)
    other_bytes = m["copies"] * state_other + batch_bytes
    devices = int(spec.get("devices", 1))
    shardings, per_device = None, state_bytes
    if devices > 1:
        state, train, val, shardings, per_device = _shard(
            state, train, val, devices)
    init_seconds = time.perf_counter() - start
    peak_init = cm.peak_rss_bytes()
    rss_init = cm.proc_status_bytes("VmRSS")

    def step(s, tb, vb):
        return opt.step(s, tb, vb)
    # sharded: the new state keeps the old one's shardings (the compiled
    # step accepts only those)
    fn = jax.jit(step, donate_argnums=(0,) if donate else (),
                 out_shardings=shardings)
    start = time.perf_counter()
    compiled = fn.lower(state, train, val).compile()
    compile_seconds = time.perf_counter() - start
    full_gathers = None
    if devices > 1:
        full_gathers = _full_gathers(compiled.as_text(), {
            tuple(x.shape) for x in jax.tree.leaves(state)
            if not x.sharding.is_fully_replicated})
    xla = {}
    try:
        ma = compiled.memory_analysis()
        for key in ("argument", "output", "alias", "temp"):
            xla[key] = int(getattr(ma, f"{key}_size_in_bytes"))
        xla["total"] = (xla["argument"] + xla["output"] - xla["alias"]
                        + xla["temp"])
    except Exception:  # noqa: BLE001 -- not every backend reports it
        xla = {}
    peak_compile = cm.peak_rss_bytes()
    phases = cm.reset_peak_rss()

    state = jax.block_until_ready(compiled(state, train, val))  # untimed
    times: List[float] = []
    cpu: List[float] = []
    faults = 0
    begin = time.perf_counter()
    while len(times) < 100 and (
            len(times) < spec["steps"]
            or time.perf_counter() - begin < spec["min_seconds"]):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        state = jax.block_until_ready(compiled(state, train, val))
        times.append(time.perf_counter() - t0)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        faults += r1.ru_minflt - r0.ru_minflt
    peak_steps = cm.peak_rss_bytes()
    finite = bool(jnp.isfinite(state.metadata["val_loss"]))
    return {
        "alg": alg, "donate": donate, "size": size,
        "n_params": n_params, "n_hyperparams": n_hyper,
        "param_dtype": str(jax.tree.leaves(state.params)[0].dtype),
        "hyper_dtype": str(jax.tree.leaves(state.hyperparams)[0].dtype),
        "inner": config["inner"], "outer": config["outer"],
        "outputs": size // spec["inputs"],
        "state_bytes": state_bytes, "batch_bytes": batch_bytes,
        "other_bytes": other_bytes,
        "init_seconds": init_seconds, "compile_seconds": compile_seconds,
        "step_seconds": times, "median_seconds": statistics.median(times),
        "median_cpu_seconds": statistics.median(cpu),
        "page_faults_per_step": faults / len(times),
        "peak_init_bytes": peak_init, "rss_init_bytes": rss_init,
        "peak_compile_bytes": peak_compile,
        "peak_steps_bytes": peak_steps if phases else None,
        "peak_bytes": max(peak_init, peak_compile, peak_steps),
        "xla": xla, "finite": finite,
        "devices": devices, "state_bytes_per_device": per_device,
        "hlo_full_gathers": full_gathers,
    }


def compare_dtypes(spec: Dict[str, Any]) -> Dict[str, Any]:
    """``spec["steps"]`` steps of each algorithm with float32 and with
    bfloat16 hyperparameters (and outer moments), from the same initial
    values (rho0 rounded to bfloat16 for both), on the same batches; how
    far the bfloat16 run ends from the float32 one."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    size, steps = int(spec["size"]), int(spec["steps"])
    out: Dict[str, Any] = {"alg": "compare", "size": size, "steps": steps,
                           "configs": []}
    for inner, outer, lr in spec["configs"]:
        for alg in spec["algorithms"]:
            runs = {}
            for dtype in ("float32", "bfloat16"):
                train_loss, val_loss, w, rho, train, val = _problem(
                    size, spec["inputs"], spec["batch"], dtype)
                rho = rho.astype(jnp.bfloat16).astype(dtype)  # same rho0
                opt = _optimizer(alg, train_loss, val_loss, inner, outer,
                                 lr)
                state = (opt.init(w, rho, batch=train)
                         if alg == "hyperdistill" else opt.init(w, rho))
                step = jax.jit(opt.step)
                for _ in range(steps):
                    state = step(state, train, val)
                runs[dtype] = (np.asarray(state.hyperparams, np.float64),
                               np.asarray(state.params, np.float64),
                               float(state.metadata["val_loss"]),
                               int(state.metadata["nonfinite_count"]))
            rho0 = np.float64(np.asarray(jnp.asarray(
                np.log(1e-4), jnp.bfloat16).astype(jnp.float32)))
            (hf, wf, lf, nf), (hb, wb, lb, nb) = (runs["float32"],
                                                  runs["bfloat16"])
            moved_f, moved_b = hf - rho0, hb - rho0
            norm = float(np.linalg.norm(moved_f))
            out["configs"].append({
                "alg": alg, "inner": inner, "outer": outer,
                "outer_lr": DEFAULT_OUTER_LR[outer] if lr is None else lr,
                "rho0": float(rho0),
                "rel_diff_hyperparams": float(
                    np.linalg.norm(hb - hf) / np.linalg.norm(hf)),
                "rel_diff_update": (float(np.linalg.norm(moved_b - moved_f)
                                          / norm) if norm > 0 else None),
                "rms_update_float32": float(np.sqrt(np.mean(moved_f ** 2))),
                "rms_update_bfloat16": float(np.sqrt(np.mean(moved_b
                                                             ** 2))),
                "frozen_fraction_bfloat16": float(np.mean(
                    (moved_b == 0) & (moved_f != 0))),
                "rel_diff_lambda": float(np.linalg.norm(
                    np.exp(hb) - np.exp(hf)) / np.linalg.norm(np.exp(hf))),
                "rel_diff_params": float(np.linalg.norm(wb - wf)
                                         / np.linalg.norm(wf)),
                "val_loss_float32": lf, "val_loss_bfloat16": lb,
                "rel_diff_val_loss": abs(lb - lf) / abs(lf),
                "nonfinite_float32": nf, "nonfinite_bfloat16": nb,
            })
    return out


def _spawn(spec: Dict[str, Any], timeout: float) -> Dict[str, Any]:
    """Runs :func:`run_worker` in a fresh interpreter."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           json.dumps(spec)]
    env = None
    if spec.get("devices", 1) > 1:  # fake CPU devices for this worker
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_"
                            f"platform_device_count={spec['devices']}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines()[::-1]:
        if line.startswith(MARKER):
            return json.loads(line[len(MARKER):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    why = ("killed by signal %d (out of memory?)" % -proc.returncode
           if proc.returncode < 0 else f"exit code {proc.returncode}")
    return {"error": f"{why}: {' | '.join(tail)}"}


# --------------------------------------------------------------------------
# Driver


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="sizes 1e3..1e5, 2 steps, no donation (a smoke "
                   "test)")
    p.add_argument("--min-size", type=float, default=1e3)
    p.add_argument("--max-size", type=float, default=None,
                   help="largest size (default 1e8, quick 1e5)")
    p.add_argument("--algorithms", default=",".join(ALGORITHMS),
                   help="comma-separated subset of " + ", ".join(KNOWN)
                   + " (greedy: Greedy with horizon 1)")
    p.add_argument("--hyper-dtype", choices=tuple(DTYPE_BYTES),
                   default="float32",
                   help="dtype of the hyperparameters (and of the outer "
                   "optimizer's moments); the parameters stay float32")
    p.add_argument("--inner", choices=tuple(INNER_BUFFERS),
                   default="momentum",
                   help="inner optimizer: sgd(0.05, momentum=0.9) or "
                   "stateless sgd(0.05)")
    p.add_argument("--outer", choices=tuple(OUTER_BUFFERS), default="adam",
                   help="outer optimizer: adam or plain sgd (no moments)")
    p.add_argument("--outer-lr", type=float, default=None,
                   help="outer learning rate (default: adam 1e-2, sgd 1e5, "
                   "as the hypergradients are about 2e-8 here)")
    p.add_argument("--compare-steps", type=int, default=0,
                   help="also run this many steps with float32 and with "
                   "bfloat16 hyperparameters at --compare-size and report "
                   "how far they end apart (0: no comparison)")
    p.add_argument("--compare-size", type=float, default=1e6)
    p.add_argument("--plot", default=None,
                   help="write a plot of peak bytes and time per step "
                   "against size (PNG)")
    p.add_argument("--merge-into", default=None,
                   help="merge this run's rows into an existing report: "
                   "rows with the same name and size are replaced, the "
                   "others kept")
    p.add_argument("--donate", choices=("both", "on", "off"), default=None,
                   help="jit the step with donate_argnums=0, without, or "
                   "both (default both, quick off)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps at least (default 5, quick 2)")
    p.add_argument("--min-seconds", type=float, default=None,
                   help="time steps for at least this long, at most 100 "
                   "steps (default 1, quick 0)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--inputs", type=int, default=1000,
                   help="rows of W; the sizes must be multiples of it")
    p.add_argument("--fit-min", type=float, default=1e5,
                   help="fit the time slope over sizes >= this")
    p.add_argument("--large", type=float, default=1e7,
                   help="check the memory model (within 20%%) at sizes >= "
                   "this")
    p.add_argument("--timeout", type=float, default=1800,
                   help="seconds allowed to one subprocess")
    p.add_argument("--devices", type=int, default=1,
                   help="shard the state over this many fake CPU devices "
                   "(gradhpo.shard_state; each worker gets XLA_FLAGS="
                   "--xla_force_host_platform_device_count); 1: no "
                   "sharding")
    p.add_argument("--out", default=None, help="write a JSON report here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def sizes_between(low: float, high: float) -> List[int]:
    """Powers of ten from ``low`` to ``high`` inclusive."""
    lo, hi = round(math.log10(low)), round(math.log10(high))
    return [10 ** k for k in range(lo, hi + 1)]


def _mb(x: Optional[float]) -> str:
    return "" if x is None else f"{x / 1e6:.1f}"


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        result = run_worker(json.loads(args.worker))
        print(MARKER + json.dumps(result), flush=True)
        return result
    quick = args.quick
    max_size = args.max_size or (1e5 if quick else 1e8)
    steps = args.steps or (2 if quick else 5)
    min_seconds = (args.min_seconds if args.min_seconds is not None
                   else (0.0 if quick else 1.0))
    algs = [a for a in args.algorithms.split(",") if a]
    unknown = set(algs) - set(KNOWN)
    if unknown:
        raise SystemExit(f"--algorithms: unknown {sorted(unknown)}; known: "
                         f"{list(KNOWN)}")
    config = {"inner": args.inner, "outer": args.outer,
              "hyper_dtype": args.hyper_dtype}
    if args.devices < 1:
        raise SystemExit(f"--devices must be >= 1, got {args.devices}")
    donate = args.donate or ("off" if quick else "both")
    donations = {"both": [False, True], "on": [True], "off": [False]}[donate]
    sizes = sizes_between(args.min_size, max_size)
    started = time.perf_counter()
    date = datetime.datetime.now().isoformat(timespec="seconds")
    load_start = cm.load_average()

    outer_lr = (DEFAULT_OUTER_LR[args.outer] if args.outer_lr is None
                else args.outer_lr)
    print(f"scaling: linear model {args.inputs} x n/{args.inputs}, one L2 "
          f"hyperparameter per weight (P = H = n), batch {args.batch}, "
          f"float32 parameters, {args.hyper_dtype} hyperparameters, inner "
          f"{args.inner}, outer {args.outer}({outer_lr:g}); sizes "
          f"{', '.join(f'{n:.0e}' for n in sizes)}")
    print(f"load average {load_start}; "
          f"{(cm.available_memory_bytes() or 0) / 1e9:.1f} GB available")
    base = _spawn({"alg": "baseline"}, args.timeout)
    if "error" in base:
        raise SystemExit(f"baseline process failed: {base['error']}")
    baseline = base["peak_bytes"]
    print(f"baseline (import jax + gradhpo, one scalar op): peak "
          f"{baseline / 1e6:.1f} MB")

    results: List[Dict[str, Any]] = []
    failures: List[Dict[str, Any]] = []
    dead = set()
    constant: Dict[Any, float] = {}
    for size in sizes:
        for alg in algs:
            for donate in donations:
                combo = (alg, donate)
                if combo in dead:
                    continue
                guess = (predicted_variable(alg, size, size, donate=donate,
                                            **config)
                         + constant.get(combo, 0.0))
                avail = cm.available_memory_bytes()
                if avail is not None and guess > 0.9 * avail:
                    why = (f"predicted peak {guess / 1e9:.1f} GB > 90% of "
                           f"the {avail / 1e9:.1f} GB available")
                    print(f"  {alg:<13} donate={donate!s:<5} n={size:.0e}: "
                          f"skipped, {why}")
                    failures.append({"alg": alg, "donate": donate,
                                     "size": size, "error": why})
                    dead.add(combo)
                    continue
                load = cm.load_average()
                res = _spawn({"alg": alg, "size": size, "donate": donate,
                              "batch": args.batch, "inputs": args.inputs,
                              "steps": steps, "min_seconds": min_seconds,
                              "devices": args.devices,
                              "outer_lr": args.outer_lr, **config},
                             args.timeout)
                if "error" in res:
                    print(f"  {alg:<13} donate={donate!s:<5} n={size:.0e}: "
                          f"FAILED, {res['error']}")
                    failures.append({"alg": alg, "donate": donate,
                                     "size": size, "error": res["error"]})
                    dead.add(combo)
                    continue
                res["load_average"] = load
                res["net_peak_bytes"] = res["peak_bytes"] - baseline
                variable = predicted_variable(
                    alg, res["n_params"], res["n_hyperparams"],
                    res["other_bytes"], donate=donate, **config)
                if combo not in constant:  # smallest size: the constant c
                    constant[combo] = max(0.0, res["net_peak_bytes"]
                                          - variable)
                res["constant_bytes"] = constant[combo]
                res["predicted_bytes"] = variable + constant[combo]
                results.append(res)
                print(f"  {alg:<13} donate={donate!s:<5} n={size:.0e}: "
                      f"{1e3 * res['median_seconds']:9.2f} ms/step, net "
                      f"peak {res['net_peak_bytes'] / 1e6:9.1f} MB "
                      f"(predicted {res['predicted_bytes'] / 1e6:.1f}), "
                      f"load {load[0] if load else '?'}"
                      + (f"; {args.devices} devices: state "
                         f"{res['state_bytes_per_device'] / 1e6:.2f} of "
                         f"{res['state_bytes'] / 1e6:.2f} MB per device, "
                         f"{res['hlo_full_gathers']} full-leaf all-gathers"
                         if args.devices > 1 else ""), flush=True)

    rows = [_row(r, args.large) for r in results]
    fits = _fits(rows, args.fit_min, args.large)
    accel = _accelerator(algs, constant, config)
    comparison = None
    if args.compare_steps > 0:
        comparison = _spawn({
            "alg": "compare", "size": int(args.compare_size),
            "steps": args.compare_steps, "inputs": args.inputs,
            "batch": args.batch, "algorithms": algs,
            "configs": [[args.inner, args.outer, args.outer_lr]]
            + ([["momentum", "adam", None]]
               if (args.inner, args.outer) != ("momentum", "adam")
               else [])}, args.timeout)
    elapsed = time.perf_counter() - started

    print()
    print(format_table(rows))
    print()
    print(format_model(algs, config))
    print()
    print(format_fits(fits, args.fit_min, args.large))
    print()
    print(format_accelerator(accel))
    if comparison is not None:
        print()
        print(format_comparison(comparison))
    checked = [r for r in rows if r["model_checked"]]
    ok = all(r["model_within_20pct"] for r in checked)
    largest = max((r["n_hyperparams"] for r in rows), default=0)
    print(f"\nmemory model within 20% at sizes >= {args.large:.0e}: "
          f"{'yes' if ok and checked else 'NO' if checked else 'n/a'} "
          f"({len(checked)} rows); largest size run: {largest:.0e}; "
          f"{elapsed:.0f} s total; load average {load_start} -> "
          f"{cm.load_average()}")
    for f in failures:
        print(f"not measured: {f['alg']} donate={f['donate']} "
              f"n={f['size']:.0e}: {f['error']}")

    report = {
        "benchmark": "scaling",
        "command": " ".join([os.path.basename(sys.argv[0])]
                            + list(argv if argv is not None
                                   else sys.argv[1:])),
        "date": date,
        "config": {
            "model": f"linear {args.inputs} x n/{args.inputs}, no bias, "
                     "least squares",
            "hyperparameters": "one L2 coefficient per weight, "
                               "lambda = exp(rho); P = H = n",
            "batch": args.batch, "inputs": args.inputs, "dtype": "float32",
            "param_dtype": "float32", "hyper_dtype": args.hyper_dtype,
            "inner": ("sgd(lr=0.05, momentum=0.9)"
                      if args.inner == "momentum" else "sgd(lr=0.02)"),
            "outer": f"{args.outer}(lr={outer_lr:g})",
            "sizes": sizes, "algorithms": algs,
            "donation": [bool(d) for d in donations], "steps": steps,
            "min_seconds": min_seconds, "quick": quick,
            "devices": args.devices,
            "fit_min": args.fit_min, "large": args.large,
        },
        "environment": dict(cm.environment(),
                            load_average_start=load_start,
                            load_average_end=cm.load_average()),
        "baseline_peak_bytes": baseline,
        "memory_model": _model_report(algs, donations, config),
        "rows": rows,
        "fits": fits,
        "accelerator_80gb": accel,
        "model_within_20pct_at_large_sizes": ok if checked else None,
        "largest_size": largest,
        "not_measured": failures,
        "seconds_total": elapsed,
    }
    if comparison is not None:
        report["bf16_vs_f32"] = comparison
    if args.out:
        cm.write_json(args.out, report)
        print(f"wrote {args.out}")
    if args.plot and rows:
        plot(rows, args.plot)
        print(f"wrote {args.plot}")
    if args.merge_into:
        merge_report(args.merge_into, report)
        print(f"merged {len(rows)} rows into {args.merge_into}")
    return report


def _row(r: Dict[str, Any], large: float) -> Dict[str, Any]:
    """A flat JSON row from a worker result."""
    net = r["net_peak_bytes"]
    ratio = net / r["predicted_bytes"] if r["predicted_bytes"] > 0 else None
    checked = r["n_hyperparams"] >= large
    xla = r.get("xla") or {}
    devices = r.get("devices", 1)
    config = {k: r.get(k, d) for k, d in (
        ("inner", "momentum"), ("outer", "adam"),
        ("hyper_dtype", "float32"))}
    return {
        "name": config_name(r["alg"], r["donate"], devices=devices,
                            **config),
        "alg": r["alg"], "donate": r["donate"], "devices": devices,
        "param_dtype": r.get("param_dtype", "float32"),
        "hyper_dtype": config["hyper_dtype"],
        "inner": config["inner"], "outer": config["outer"],
        "n_params": r["n_params"], "n_hyperparams": r["n_hyperparams"],
        "median_seconds": r["median_seconds"],
        "min_seconds": min(r["step_seconds"]),
        "steps_timed": len(r["step_seconds"]),
        "median_cpu_seconds": r["median_cpu_seconds"],
        "page_faults_per_step": r["page_faults_per_step"],
        "ns_per_hyperparam": 1e9 * r["median_seconds"] / r["n_hyperparams"],
        "peak_bytes": r["peak_bytes"],
        "net_peak_bytes": net,
        "bytes_per_hyperparam": net / r["n_hyperparams"],
        "peak_init_bytes": r["peak_init_bytes"],
        "peak_compile_bytes": r["peak_compile_bytes"],
        "peak_steps_bytes": r["peak_steps_bytes"],
        "state_bytes": r["state_bytes"],
        "state_bytes_per_device": r.get("state_bytes_per_device",
                                        r["state_bytes"]),
        "hlo_full_gathers": r.get("hlo_full_gathers"),
        "predicted_bytes": r["predicted_bytes"],
        "constant_bytes": r["constant_bytes"],
        "measured_over_predicted": ratio,
        "model_checked": checked,
        "model_within_20pct": (None if not checked or ratio is None
                               else bool(abs(ratio - 1.0) <= 0.2)),
        "xla_argument_bytes": xla.get("argument"),
        "xla_output_bytes": xla.get("output"),
        "xla_alias_bytes": xla.get("alias"),
        "xla_temp_bytes": xla.get("temp"),
        "xla_total_bytes": xla.get("total"),
        "compile_seconds": r["compile_seconds"],
        "init_seconds": r["init_seconds"],
        "finite": r["finite"],
        "load_average_1min": (r["load_average"] or [None])[0],
    }


def _fits(rows: List[Dict[str, Any]], fit_min: float, large: float
          ) -> Dict[str, Dict[str, Any]]:
    """Log-log slopes of wall and CPU time per step against size.

    ``slope``: wall time over sizes >= ``fit_min``; ``slope_all``: every
    size; ``slope_large``: sizes >= ``large``; ``cpu_slope``: CPU time
    (user + system, less sensitive to other processes) over sizes >=
    ``fit_min``.
    """
    fits = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        own = [r for r in rows if r["name"] == name]
        fit = {}
        for label, low, key in (("", fit_min, "median_seconds"),
                                ("_all", 0, "median_seconds"),
                                ("_large", large, "median_seconds"),
                                ("cpu_", fit_min, "median_cpu_seconds")):
            sel = [r for r in own if r["n_hyperparams"] >= low
                   and r[key] > 0]
            f = cm.loglog_fit([r["n_hyperparams"] for r in sel],
                              [r[key] for r in sel])
            pre, post = ("cpu_", "") if label == "cpu_" else ("", label)
            fit.update({f"{pre}slope{post}": f["slope"],
                        f"{pre}r2{post}": f["r2"],
                        f"{pre}points{post}": f["points"]})
        fits[name] = fit
    return fits


def _accelerator(algs: List[str], constant: Dict[Any, float],
                 config: Optional[Dict[str, str]] = None,
                 memory: float = 80e9) -> Dict[str, Dict[str, Any]]:
    """What the model says an 80 GB device holds (P = H; without
    donation)."""
    config = config or {}
    out = {}
    for alg in algs:
        const = max([v for (a, _), v in constant.items() if a == alg],
                    default=0.0)
        per = model_for(alg, **config)["bytes_per_hyperparam"]
        out[config_name(alg, False, **config)] = {
            "bytes_per_hyperparam": per,
            "max_hyperparams": int((memory - const) // per),
            "peak_bytes_at_1e9": per * 1e9 + const,
            "fits_1e9": bool(per * 1e9 + const <= memory),
        }
    return out


def format_table(rows: List[Dict[str, Any]]) -> str:
    header = (f"{'case':<21} {'n':>7} {'ms/step':>10} {'ns/hp':>7} "
              f"{'peak MB':>9} {'B/hp':>7} {'pred MB':>9} {'meas/pred':>9} "
              f"{'XLA MB':>9} {'faults':>7} {'load':>5}")
    lines = [header, "-" * len(header)]
    for r in rows:
        ratio = r["measured_over_predicted"]
        flag = ("" if r["model_within_20pct"] is None
                else " ok" if r["model_within_20pct"] else " OFF")
        lines.append(
            f"{r['name']:<21} {r['n_hyperparams']:>7.0e} "
            f"{1e3 * r['median_seconds']:>10.3f} "
            f"{r['ns_per_hyperparam']:>7.2f} "
            f"{r['net_peak_bytes'] / 1e6:>9.1f} "
            f"{r['bytes_per_hyperparam']:>7.1f} "
            f"{r['predicted_bytes'] / 1e6:>9.1f} "
            f"{'' if ratio is None else f'{ratio:.3f}':>9} "
            f"{_mb(r['xla_total_bytes']):>9} "
            f"{r['page_faults_per_step']:>7.0f} "
            f"{r['load_average_1min'] or '':>5}{flag}")
    lines.append("peak MB: process peak (VmHWM) minus the baseline process; "
                 "B/hp = that / H; pred MB: the memory model; XLA MB: "
                 "arguments + outputs - aliased + temporaries of the "
                 "compiled step; faults: minor page faults per step")
    return "\n".join(lines)


def format_model(algs: List[str],
                 config: Optional[Dict[str, str]] = None) -> str:
    config = config or {}
    h = DTYPE_BYTES[config.get("hyper_dtype", "float32")]
    lines = [f"memory model (float32 parameters, {h}-byte hyperparameters):"
             f" peak = 4 a P + {h} b H + batches + c"]
    for alg in algs:
        for donate in (False, True):
            m = model_for(alg, donate=donate, **config)
            if donate and not m["donate"]:
                continue  # donation does not change this model
            name = config_name(alg, donate, **config)
            lines.append(f"  {name:<22} a={m['a']} b={m['b']}"
                         + (f" +{m['mask_P']} B/P" if m["mask_P"] else "")
                         + f" ({m['bytes_per_hyperparam']} B per "
                         f"hyperparameter at P = H)  state: {m['state']}")
            lines.append(f"  {'':<22} step: {m['copies']} state(s), plus "
                         f"{m['temporaries']}")
    return "\n".join(lines)


def _model_report(algs: List[str], donations: List[bool],
                  config: Dict[str, str]) -> Dict[str, Dict[str, Any]]:
    """The memory model of every configuration run, by row name without
    the devices (default configuration: by algorithm, as before)."""
    out = {}
    for alg in algs:
        for donate in donations:
            m = model_for(alg, donate=donate, **config)
            name = (alg if config_name(alg, False, **config) == alg
                    else config_name(alg, donate and m["donate"], **config))
            out.setdefault(name, m)
    return out


def format_comparison(comp: Dict[str, Any]) -> str:
    if "error" in comp:
        return f"bfloat16 against float32: FAILED, {comp['error']}"
    lines = [f"bfloat16 against float32 hyperparameters, "
             f"n={comp['size']:.0e}, {comp['steps']} steps from the same "
             f"rho0 = {comp['configs'][0]['rho0']:.4f}:",
             f"  {'case':<30} {'|d rho|/|rho|':>13} {'|d upd|/|upd|':>13} "
             f"{'frozen':>7} {'|d lam|/|lam|':>13} {'|d w|/|w|':>10} "
             f"{'d val/val':>10}"]
    for c in comp["configs"]:
        upd = c["rel_diff_update"]
        lines.append(
            f"  {c['alg'] + ' ' + c['inner'] + '/' + c['outer']:<30} "
            f"{c['rel_diff_hyperparams']:>13.2e} "
            f"{'' if upd is None else f'{upd:.3f}':>13} "
            f"{c['frozen_fraction_bfloat16']:>7.3f} "
            f"{c['rel_diff_lambda']:>13.2e} {c['rel_diff_params']:>10.2e} "
            f"{c['rel_diff_val_loss']:>10.2e}")
    lines.append("  d upd: the bfloat16 run's change of rho minus the "
                 "float32 one, relative to the float32 change; frozen: "
                 "share of entries the float32 run moved and the bfloat16 "
                 "run did not")
    return "\n".join(lines)


def plot(rows: List[Dict[str, Any]], path: str) -> None:
    """Net peak per hyperparameter and time per step against size."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["name"] for r in rows):
        own = [r for r in rows if r["name"] == name]
        n = [r["n_hyperparams"] for r in own]
        line, = ax1.plot(n, [r["bytes_per_hyperparam"] for r in own], "o-",
                         label=name)
        ax1.plot(n, [r["predicted_bytes"] / r["n_hyperparams"]
                     for r in own], "x--", color=line.get_color())
        ax2.plot(n, [r["median_seconds"] for r in own], "o-", label=name,
                 color=line.get_color())
    ax1.set(xscale="log", yscale="log", xlabel="hyperparameters H (= P)",
            ylabel="net peak bytes / H",
            title="Peak memory per hyperparameter (x: model)")
    ax2.set(xscale="log", yscale="log", xlabel="hyperparameters H (= P)",
            ylabel="seconds per step (median)", title="Time per step")
    ax1.legend(fontsize=7)
    ax1.grid(True, which="both", alpha=0.3)
    ax2.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_report(path: str, report: Dict[str, Any]) -> Dict[str, Any]:
    """Merges ``report``'s rows into the report at ``path``: rows with the
    same name and size are replaced, every other row and top-level key is
    kept; every row gains ``devices``, ``param_dtype`` and ``hyper_dtype``
    (float32 where absent: the rows measured before these options). The
    run itself is recorded under ``runs``."""
    with open(path) as f:
        old = json.load(f)
    new_keys = {(r["name"], r["n_hyperparams"]) for r in report["rows"]}
    rows = [r for r in old.get("rows", [])
            if (r["name"], r["n_hyperparams"]) not in new_keys]
    rows += report["rows"]
    for r in rows:
        r.setdefault("devices", 1)
        r.setdefault("param_dtype", "float32")
        r.setdefault("hyper_dtype", "float32")
    old["rows"] = rows
    for key in ("memory_model", "fits", "accelerator_80gb"):
        old.setdefault(key, {}).update(report.get(key, {}))
    run = {k: report[k] for k in (
        "command", "date", "config", "environment", "baseline_peak_bytes",
        "model_within_20pct_at_large_sizes", "largest_size",
        "not_measured", "seconds_total") if k in report}
    run["rows"] = sorted({r["name"] for r in report["rows"]})
    runs = [r for r in old.get("runs", []) if r.get("command")
            != run["command"]]
    old["runs"] = runs + [run]
    if "bf16_vs_f32" in report:
        old["bf16_vs_f32"] = report["bf16_vs_f32"]
    cm.write_json(path, old)
    return old


def format_fits(fits: Dict[str, Dict[str, Any]], fit_min: float,
                large: float) -> str:
    lines = ["log-log least-squares slope of time per step against size",
             f"{'case':<21} {'>=' + f'{fit_min:.0e}':>9} {'r2':>6} "
             f"{'all':>6} {'>=' + f'{large:.0e}':>9} {'CPU time':>9}"]
    for name, f in fits.items():
        lines.append(f"{name:<21} {f['slope']:>9.3f} {f['r2']:>6.3f} "
                     f"{f['slope_all']:>6.3f} {f['slope_large']:>9.3f} "
                     f"{f['cpu_slope']:>9.3f}")
    lines.append(f"(wall time unless marked; CPU time = user + system over "
                 f"sizes >= {fit_min:.0e})")
    return "\n".join(lines)


def format_accelerator(accel: Dict[str, Dict[str, Any]]) -> str:
    lines = ["an 80 GB accelerator, by the memory model (P = H, without "
             "donation; not measured):"]
    for alg, a in accel.items():
        lines.append(
            f"  {alg:<13} {a['bytes_per_hyperparam']} B per hyperparameter: "
            f"at most {a['max_hyperparams'] / 1e9:.2f}e9; 1e9 needs "
            f"{a['peak_bytes_at_1e9'] / 1e9:.1f} GB "
            f"({'fits' if a['fits_1e9'] else 'does not fit'})")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
