"""End-to-end runs of examples/cifar10.py and examples/augmentation.py, and
numeric checks of the differentiable augmentation they share."""

import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import gradhpo as gh

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import augmentation  # noqa: E402
import cifar10  # noqa: E402
import data_utils  # noqa: E402
from example_checks import (  # noqa: E402
    check_colours, check_saved_line, check_verdict)


def _finite(rows, keys):
    return all(math.isfinite(r[k]) for r in rows for k in keys)


# -- the augmentation itself --------------------------------------------------

def test_translate_integer_and_half_pixel_shifts():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 6, 3)).astype(np.float32)
    out = np.asarray(augmentation.translate(
        jnp.asarray(x), jnp.array([[1.0, -2.0], [0.5, 0.0]])))
    # integer shift: output (i, j) = input (i - 1, j + 2), zero outside
    expected = np.zeros_like(x[0])
    expected[1:, :-2] = x[0, :-1, 2:]
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    # half a pixel down: the mean of a row and the row above (zero above 0)
    above = np.concatenate([np.zeros_like(x[1, :1]), x[1, :-1]])
    np.testing.assert_allclose(out[1], 0.5 * (x[1] + above), atol=1e-6)


def _tiny_problem(seed):
    rng = np.random.default_rng(seed)
    n, side = 6, 8
    shape = (side, side, 1)
    train = {"x": jnp.asarray(rng.uniform(0, 1, (n,) + shape)),
             "y": jnp.asarray(rng.integers(0, 10, n))}
    val = {"x": jnp.asarray(rng.uniform(0, 1, (n,) + shape)),
           "y": jnp.asarray(rng.integers(0, 10, n))}
    noise = {k: jnp.asarray(v) for k, v in augmentation.draw_noise(
        rng, n, shape, np.float64).items()}
    return train, val, noise


def test_magnitude_hypergradient_equals_central_difference(x64, key):
    """The T1-T2 hypergradient w.r.t. both magnitude logits equals a central
    difference of the one-step objective written without the library, for
    the noise carried in the batch; another noise draw gives another value
    (so the batch's noise is what both the step and its VJP used)."""
    train, val, noise = _tiny_problem(0)
    batch = {**train, **noise}
    train_loss, val_loss = augmentation.make_losses(max_shift=2.0,
                                                    max_noise=0.5)
    params = augmentation.init_mlp(key, (64, 8, 10))
    assert params[0]["w"].dtype == jnp.float64
    hp = {"logit": jnp.array([-0.3, 0.4])}
    lr = 0.5
    opt = gh.T1T2(train_loss, val_loss, optax.sgd(lr), optax.sgd(0.0))
    h = opt.compute_hypergradient(opt.init(params, hp), batch, val)["logit"]

    @jax.jit
    def objective(logit, b):
        grads = jax.grad(train_loss)(params, {"logit": logit}, b)
        stepped = jax.tree.map(lambda w, g: w - lr * g, params, grads)
        return val_loss(stepped, None, val)

    delta = 1e-5
    fd = np.array([(objective(hp["logit"].at[i].add(delta), batch)
                    - objective(hp["logit"].at[i].add(-delta), batch))
                   / (2 * delta) for i in range(2)])
    np.testing.assert_allclose(h, fd, rtol=1e-6, atol=1e-12)
    assert np.all(np.abs(fd) > 1e-5)   # both magnitudes matter
    _, _, other_noise = _tiny_problem(1)
    other = jax.grad(objective)(hp["logit"], {**train, **other_noise})
    assert not np.allclose(other, h, rtol=0.05)


# -- augmentation.py ----------------------------------------------------------

def test_augmentation_example_quick(tmp_path, capsys):
    rows = augmentation.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "T1-T2 tuned" in out and "best of grid" in out
    results = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "augmentation.png").stat().st_size > 0
    by_name = {r["method"]: r for r in results["rows"]}
    assert set(by_name) == {"T1-T2 tuned", "HyperDistill tuned",
                            "no augmentation", "fixed m=0.2",
                            "fixed m=0.5", "fixed m=0.8"}
    assert rows == results["rows"]
    assert _finite(rows, ("val_loss", "test_acc", "shift", "noise"))
    args = results["args"]
    steps, batch = args["steps"], args["batch_size"]
    # gradhpo's count with validation batches of the training batch's size:
    # T1-T2 = training gradient + validation gradient + a second-order
    # product (2 G) = 4 G a step; HyperDistill one more training gradient
    assert by_name["T1-T2 tuned"]["grad_evals"] == pytest.approx(4 * steps)
    assert by_name["HyperDistill tuned"]["grad_evals"] == pytest.approx(
        5 * steps)
    assert by_name["no augmentation"]["grad_evals"] == steps
    # the grid of three values shares the larger budget (HyperDistill's):
    # plain steps at 1 G and a validation forward pass per value
    _, val, _ = augmentation.load(augmentation.parse_args(
        ["--quick", "--out", str(tmp_path)]))
    select = len(val[1]) / (3 * batch)
    grid_steps = int(5 * steps / 3 - select)
    for g in ("0.2", "0.5", "0.8"):
        assert by_name[f"fixed m={g}"]["grad_evals"] == pytest.approx(
            grid_steps + select)
        assert results["curves"][f"fixed m={g}"][-1]["grad_evals"] == \
            grid_steps
    assert results["grid_total"]["grad_evals"] == pytest.approx(
        3 * (grid_steps + select))
    assert results["grid_total"]["grad_evals"] <= 5 * steps
    assert results["curves"]["T1-T2"][-1]["grad_evals"] == pytest.approx(
        4 * steps)
    assert by_name["no augmentation"]["shift"] == 0.0
    init = results["initial_magnitude"]
    for name in ("T1-T2 tuned", "HyperDistill tuned"):
        m = np.array([by_name[name]["shift"], by_name[name]["noise"]])
        assert np.all(np.abs(m - init) > 1e-3), (name, m)
        curve = results["curves"][name.split()[0]]
        traj = np.array([[c["shift"], c["noise"]] for c in curve])
        assert np.all((traj >= 0) & (traj <= 1))
        np.testing.assert_allclose(traj[-1], m)
    assert sum(r["note"] == "best of grid" for r in rows) == 1
    # where the files are, and the verdict: the tuned runs, no augmentation
    # and the grid's pick (charged the whole grid)
    assert check_saved_line(out, ["results.json", "augmentation.png"]) == \
        tmp_path
    compared = [r for r in rows if not r["method"].startswith("fixed")
                or r["note"] == "best of grid"]
    assert len(compared) == 4
    check_verdict(out, compared, "test_acc")
    figure = augmentation.plot(results["curves"], augmentation.parse_args(
        ["--quick", "--out", str(tmp_path)]))
    for line in check_colours(figure, set(results["curves"])):
        assert line.get_xdata()[0] == 0, line.get_gid()
    for curve in results["curves"].values():
        assert curve[0]["grad_evals"] == curve[0]["step"] == 0


# -- cifar10.py ---------------------------------------------------------------

def test_cifar10_without_data_exits_2_with_instructions(capsys):
    with pytest.raises(SystemExit) as info:
        cifar10.main(["--out", "unused"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    for needle in ("CIFAR-10 is needed", "--data-dir",
                   "cifar-10-python.tar.gz", "download_cifar10", "--quick"):
        assert needle in err


def test_resnet20_has_the_papers_layout():
    """16/32/64 channels, 3 blocks per stage, option-A shortcuts: 19 3x3
    convolutions + a 64x10 dense layer = 268,346 weights (He et al.: 0.27M),
    plus a GroupNorm scale and bias per channel of every convolution."""
    model = cifar10.ResNet()
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 32, 32, 3)))["params"]
    leaves = jax.tree_util.tree_leaves_with_path(shapes)
    kernels = [x for p, x in leaves if p[-1].key == "kernel"]
    assert sum(len(x.shape) == 4 for x in kernels) == 19
    convs = sum(math.prod(x.shape) for x in kernels) + 10
    assert convs == 268346
    channels = 16 * 7 + 32 * 6 + 64 * 6
    assert sum(math.prod(x.shape) for _, x in leaves) == convs + 2 * channels
    out = jax.eval_shape(model.apply, {"params": shapes},
                         jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 10)


def test_cifar10_example_quick(tmp_path, capsys):
    # --blocks 1 (ResNet-8) keeps the compilation short; the full ResNet-20
    # layout is checked above without compiling it
    rows = cifar10.main(["--quick", "--blocks", "1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "generated" in out and "T1-T2" in out
    results = json.loads((tmp_path / "results.json").read_text())
    for name in ("val_loss.png", "hyperparameters.png"):
        assert (tmp_path / name).stat().st_size > 0
    # the generated files are real CIFAR-10 python batches
    x, y = data_utils.load_cifar10(results["data_dir"], "train")
    assert x.shape == (300, 32, 32, 3) and x.dtype == np.uint8
    assert y.shape == (300,) and set(np.unique(y)) <= set(range(10))
    xt, _ = data_utils.load_cifar10(results["data_dir"], "test")
    assert xt.shape == (100, 32, 32, 3)

    assert [r["method"] for r in rows] == ["untuned", "T1-T2"]
    keys = ("val_loss", "test_acc", "weight_decay", "label_smoothing",
            "aug_magnitude", "seconds")
    assert _finite(rows, keys)
    untuned, tuned = rows
    initial = results["initial"]
    for key in ("weight_decay", "label_smoothing", "aug_magnitude"):
        assert untuned[key] == pytest.approx(initial[key], rel=1e-6)
        assert abs(tuned[key] / initial[key] - 1) > 1e-4, key
    assert 0 < tuned["label_smoothing"] < cifar10.MAX_SMOOTHING
    assert 0 < tuned["aug_magnitude"] < 1
    # each run its own cost: plain steps 1 G; a T1-T2 step 4 G (training
    # and same-size validation gradients, a second-order product at 2 G)
    steps = results["args"]["steps"]
    assert untuned["grad_evals"] == steps
    assert tuned["grad_evals"] == pytest.approx(4 * steps)
    assert results["curves"]["T1-T2"][-1]["grad_evals"] == pytest.approx(
        4 * steps)
    curve = results["curves"]["T1-T2"]
    assert curve[-1]["step"] == results["args"]["steps"]
    assert all(0 < c["aug_magnitude"] < 1 for c in curve)
    # the saved files, the verdict (untuned: a quarter of the budget) and
    # plots with one colour per run, every curve from 0
    assert check_saved_line(out, ["results.json", "val_loss.png",
                                  "hyperparameters.png"]) == tmp_path
    check_verdict(out, rows, "test_acc")
    assert "untuned used a quarter of" in out or \
        "T1-T2 used four times" in out
    figures = cifar10.plot(results["curves"], str(tmp_path), "ResNet-8")
    for figure in figures.values():
        for line in check_colours(figure, {"untuned", "T1-T2"}):
            assert line.get_xdata()[0] == 0
