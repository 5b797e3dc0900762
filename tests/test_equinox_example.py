"""examples/equinox_mlp.py: an Equinox module tuned by gh.T1T2.

The hypergradient gradhpo computes through ``eqx.partition`` /
``eqx.combine`` is checked in float64 against the same MLP written as plain
dicts and against a central difference of the one-step validation loss;
the quick run's reported costs are checked against the library's count;
``--help`` answers before JAX loads and documents every flag."""

import json
import pathlib
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh

eqx = pytest.importorskip("equinox")
pytest.importorskip("sklearn")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import equinox_mlp  # noqa: E402

LR, MOMENTUM = 0.3, 0.9


def _problem(seed=0, sizes=(5, 6, 6, 4)):
    """A small float64 Equinox MLP, its partition and two batches."""
    rng = np.random.default_rng(seed)
    model = equinox_mlp.make_model(jax.random.PRNGKey(seed), sizes[0],
                                   sizes[1], len(sizes) - 2, sizes[-1])
    params, static = eqx.partition(model, eqx.is_inexact_array)
    hp = {"log_l2": tuple(jnp.asarray(v) for v in (-1.0, -2.0, -0.5))}
    batches = [(jnp.asarray(rng.normal(size=(n, sizes[0]))),
                jnp.asarray(rng.integers(0, sizes[-1], n)))
               for n in (8, 7)]
    return model, params, static, hp, batches


def _as_dicts(model):
    """The same weights as ``[{"w": (in, out), "b": (out,)}]``."""
    return [{"w": layer.weight.T, "b": layer.bias} for layer in model.layers]


def _dict_losses():
    def logits(params, x):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    def val_loss(params, hp, batch):
        x, y = batch
        return optax.softmax_cross_entropy_with_integer_labels(
            logits(params, x), y).mean()

    def train_loss(params, hp, batch):
        return val_loss(params, hp, batch) + sum(
            jnp.exp(rho) * 0.5 * jnp.sum(layer["w"] ** 2)
            for rho, layer in zip(hp["log_l2"], params))

    return train_loss, val_loss


def test_equinox_hypergradient_equals_the_plain_dict_mlp(x64):
    """Identical weights, data and optimizers: the Equinox model and a
    hand-written dict MLP give the same hypergradient and the same step."""
    model, params, static, hp, (train, val) = _problem()
    assert model.layers[0].weight.dtype == jnp.float64
    inner = optax.sgd(LR, momentum=MOMENTUM)
    eqx_opt = gh.T1T2(*equinox_mlp.make_losses(static), inner,
                      optax.sgd(1.0))
    dict_opt = gh.T1T2(*_dict_losses(), inner, optax.sgd(1.0))
    eqx_state = eqx_opt.init(params, hp)
    dict_state = dict_opt.init(_as_dicts(model), hp)
    h_eqx = eqx_opt.compute_hypergradient(eqx_state, train, val)
    h_dict = dict_opt.compute_hypergradient(dict_state, train, val)
    assert len(h_eqx["log_l2"]) == len(model.layers) == 3
    np.testing.assert_allclose(h_eqx["log_l2"], h_dict["log_l2"],
                               rtol=1e-10, atol=1e-14)
    assert np.all(np.abs(np.asarray(h_eqx["log_l2"])) > 1e-6)  # not zero
    # one step each: the weights, penalties and validation losses agree
    eqx_state = eqx_opt.step(eqx_state, train, val)
    dict_state = dict_opt.step(dict_state, train, val)
    stepped = eqx.combine(eqx_state.params, static)
    for layer, ref in zip(stepped.layers, dict_state.params):
        np.testing.assert_allclose(layer.weight.T, ref["w"], rtol=1e-12)
        np.testing.assert_allclose(layer.bias, ref["b"], rtol=1e-12)
    np.testing.assert_allclose(eqx_state.hyperparams["log_l2"],
                               dict_state.hyperparams["log_l2"], rtol=1e-12)
    np.testing.assert_allclose(eqx_state.metadata["val_loss"],
                               dict_state.metadata["val_loss"], rtol=1e-12)
    assert float(eqx_state.metadata["grad_evals"]) == pytest.approx(
        1 + 2 + 7 / 8)      # train grad + second order + val grad (7 of 8)


def test_equinox_hypergradient_equals_central_difference(x64):
    """After one step (a non-zero momentum buffer), the hypergradient of
    every layer's log-penalty equals a central difference of
    rho -> L_val(w - lr * (mu * m + grad L_tr(w, rho)))."""
    _, params, static, hp, (train, val) = _problem(seed=1)
    train_loss, val_loss = equinox_mlp.make_losses(static)
    opt = gh.T1T2(train_loss, val_loss, optax.sgd(LR, momentum=MOMENTUM),
                  optax.adam(0.1))
    state = opt.step(opt.init(params, hp), val, train)   # other batches
    w, rho = state.params, state.hyperparams
    buffer = next(s.trace for s in state.inner_opt_state
                  if isinstance(s, optax.TraceState))
    assert max(float(jnp.abs(b).max()) for b in jax.tree.leaves(buffer)) > 0
    h = opt.compute_hypergradient(state, train, val)

    @jax.jit
    def objective(log_l2):
        g = jax.grad(train_loss)(w, {"log_l2": log_l2}, train)
        w1 = jax.tree.map(lambda p, m, gi: p - LR * (MOMENTUM * m + gi),
                          w, buffer, g)
        return val_loss(w1, None, val)

    eps = 1e-6
    for layer in range(len(rho["log_l2"])):
        def shifted(d):
            return tuple(r + d if i == layer else r
                         for i, r in enumerate(rho["log_l2"]))
        fd = (objective(shifted(eps)) - objective(shifted(-eps))) / (2 * eps)
        np.testing.assert_allclose(h["log_l2"][layer], fd, rtol=1e-6,
                                   atol=1e-11)


def test_quick_run_reports_the_library_count(tmp_path, capsys):
    result, state = equinox_mlp.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert saved == json.loads(json.dumps(result))
    args = saved["args"]
    assert (args["steps"], args["max_train"], args["depth"]) == (40, 300, 2)
    tuned, untuned, same_steps = saved["rows"]
    assert [r["method"] for r in saved["rows"]] == [
        "T1-T2 tuned L2", "untuned L2", "untuned L2, same steps"]
    # the tuned run's cost is gradhpo's own count: 4 G a step here
    count = float(state.metadata["grad_evals"])
    assert tuned["grad_evals"] == count == 4.0 * args["steps"]
    assert int(state.step) == tuned["steps"] == args["steps"]
    assert saved["curves"]["T1-T2 tuned L2"][-1][0] == count
    # equal measured compute: one plain step per gradient evaluation
    assert untuned["steps"] == untuned["grad_evals"] == count
    assert saved["curves"]["untuned L2"][-1][0] == count
    assert same_steps["steps"] == args["steps"]
    # the penalties: one per Linear layer, tuned away from the start
    start_l2 = np.exp(args["init_log_l2"])
    assert len(tuned["l2"]) == args["depth"] + 1
    np.testing.assert_allclose(untuned["l2"], start_l2, rtol=1e-6)
    np.testing.assert_allclose(
        tuned["l2"], np.exp(state.hyperparams["log_l2"]), rtol=1e-6)
    assert all(abs(np.log(v / start_l2)) > 0.05 for v in tuned["l2"])
    for r in saved["rows"]:
        assert np.isfinite(r["val_loss"]) and np.isfinite(r["test_loss"])
        assert 0.5 < r["test_acc"] <= 1.0
    # the verdict names the run with the lower test loss and the budget
    won = ("the T1-T2 tuned L2 won"
           if tuned["test_loss"] < untuned["test_loss"]
           else "the untuned L2 won")
    assert won in saved["verdict"]
    assert f"at {count:.0f} gradient evaluations each" in saved["verdict"]
    low = min(tuned["test_loss"], untuned["test_loss"])
    assert f"{low:.4f}" in saved["verdict"]
    assert saved["verdict"] in out and str(tmp_path / "results.json") in out


def test_quick_fills_only_the_flags_not_given():
    args = equinox_mlp.parse_args(["--quick", "--steps", "7"])
    assert (args.steps, args.eval_every, args.max_train) == (7, 20, 300)
    args = equinox_mlp.parse_args([])
    assert (args.steps, args.eval_every, args.max_train) == (1500, 100, 0)


def test_help_answers_quickly_and_lists_every_flag():
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime",
         str(ROOT / "examples" / "equinox_mlp.py"), "--help"],
        capture_output=True, text=True, timeout=60)
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:")
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "argparse" in imported
    assert not imported & {"jax", "jaxlib", "equinox", "optax", "gradhpo",
                           "numpy", "tqdm", "sklearn"}
    assert seconds < 5.0
    flags = [a for a in equinox_mlp.build_parser()._actions
             if a.option_strings and a.dest != "help"]
    assert {f.option_strings[0] for f in flags} >= {
        "--seed", "--quick", "--out", "--steps"}
    for flag in flags:
        assert flag.help, flag.option_strings
        assert flag.option_strings[0] in proc.stdout
