"""Smoke tests of benchmarks/scaling.py and benchmarks/population.py.

Both scripts run in ``--quick`` mode in a subprocess, as a user would, on a
subset of rows to stay short; the tests check the JSON reports (structure,
positive finite times, the memory model's bookkeeping), never a timing.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _run(tmp_path, script, *args):
    out = tmp_path / f"{script}.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCH, f"{script}.py"), "--quick",
         "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_scaling_quick(tmp_path):
    stdout, report = _run(tmp_path, "scaling", "--max-size", "1e4",
                          "--algorithms", "t1t2_exact,hyperdistill",
                          "--donate", "on")
    assert "least-squares slope" in stdout  # the tables were printed
    assert "80 GB" in stdout
    assert report["benchmark"] == "scaling"
    assert report["config"]["quick"] is True
    assert report["config"]["sizes"] == [1000, 10000]
    assert report["config"]["donation"] == [True]
    assert report["baseline_peak_bytes"] > 0
    assert report["not_measured"] == []
    assert report["largest_size"] == 10000

    rows = report["rows"]
    assert [(r["name"], r["n_hyperparams"]) for r in rows] == [
        ("t1t2_exact_donated", 1000), ("hyperdistill_donated", 1000),
        ("t1t2_exact_donated", 10000), ("hyperdistill_donated", 10000)]
    model = report["memory_model"]
    assert (model["t1t2_exact"]["a"], model["t1t2_exact"]["b"]) == (4, 6)
    assert (model["hyperdistill"]["a"],
            model["hyperdistill"]["b"]) == (7, 6)
    for r in rows:
        n = r["n_hyperparams"]
        assert r["n_params"] == n  # one hyperparameter per weight
        assert r["finite"] is True
        for key in ("median_seconds", "ns_per_hyperparam", "peak_bytes",
                    "predicted_bytes", "xla_argument_bytes"):
            assert _positive(r[key]), (r["name"], key)
        assert r["bytes_per_hyperparam"] == r["net_peak_bytes"] / n
        # the state holds what the model counts: 2P + 3H floats (+ w* for
        # HyperDistill), plus a few scalars and, for HyperDistill, D*
        m = model[r["alg"]]
        counted = 4 * (m["state_P"] * n + m["state_H"] * n)
        extra = r["state_bytes"] - counted
        assert 0 <= extra < 2 ** 20, (r["name"], extra)
        assert r["xla_argument_bytes"] >= r["state_bytes"]
        assert r["model_checked"] is False  # only sizes >= 1e7 are checked
    # the constant c is the net peak at the smallest size
    for r in rows[:2]:
        assert r["measured_over_predicted"] == 1.0
    fits = report["fits"]
    assert set(fits) == {"t1t2_exact_donated", "hyperdistill_donated"}
    assert all(math.isfinite(f["slope_all"]) and f["points_all"] == 2
               for f in fits.values())
    accel = report["accelerator_80gb"]
    assert accel["t1t2_exact"]["bytes_per_hyperparam"] == 40
    assert accel["t1t2_exact"]["max_hyperparams"] > 10 ** 9


def test_population_quick(tmp_path):
    stdout, report = _run(tmp_path, "population", "--sizes", "1,2",
                          "--algorithms", "t1t2_exact,hyperdistill",
                          "--rounds", "2")
    assert "speed-up" in stdout
    assert report["benchmark"] == "population"
    assert report["config"]["sizes"] == [1, 2]
    assert report["config"]["n_hyperparams"] > 0
    rows = report["rows"]
    assert [(r["alg"], r["configurations"]) for r in rows] == [
        ("t1t2_exact", 1), ("t1t2_exact", 2), ("hyperdistill", 1),
        ("hyperdistill", 2)]
    for r in rows:
        for key in ("loop_configs_per_second", "vmap_configs_per_second",
                    "speedup", "speedup_iqr_low", "speedup_iqr_high"):
            assert _positive(r[key]), (r["name"], key)
        assert math.isclose(r["loop_configs_per_second"]
                            * r["loop_seconds_per_config"], 1.0)
        assert r["speedup_iqr_low"] <= r["speedup"] <= r["speedup_iqr_high"]
        assert r["goal_speedup"] is None and r["pass"] is None  # n != 32
    assert report["goal"] == {"configurations": 32, "speedup": 5.0}
    assert report["all_goals_pass"] is None


def test_scaling_quick_bfloat16_sgd(tmp_path):
    """The low-memory configuration: bfloat16 hyperparameters, stateless
    SGD inside and outside, donated; rows carry their dtypes and devices,
    and the state holds exactly 4 bytes per weight and 2 per
    hyperparameter."""
    merged = tmp_path / "merged.json"
    merged.write_text(json.dumps({
        "benchmark": "scaling", "largest_size": 10 ** 8, "rows": [
            {"name": "t1t2_exact", "n_hyperparams": 1000, "devices": 1},
            {"name": "t1t2_exact_4dev", "n_hyperparams": 10 ** 6,
             "devices": 4},
            {"name": "greedy_donated_sgd_sgd_bf16", "n_hyperparams": 1000,
             "stale": True}],
        "sharded_rows": {"kept": True}}))
    stdout, report = _run(tmp_path, "scaling", "--max-size", "1e4",
                          "--algorithms", "t1t2_exact,greedy",
                          "--donate", "on", "--hyper-dtype", "bfloat16",
                          "--inner", "sgd", "--outer", "sgd",
                          "--merge-into", str(merged))
    assert "2-byte hyperparameters" in stdout
    config = report["config"]
    assert (config["param_dtype"], config["hyper_dtype"]) == (
        "float32", "bfloat16")
    assert config["inner"] == "sgd(lr=0.02)"
    assert config["outer"] == "sgd(lr=100000)"
    rows = report["rows"]
    assert [(r["name"], r["n_hyperparams"]) for r in rows] == [
        ("t1t2_exact_donated_sgd_sgd_bf16", 1000),
        ("greedy_donated_sgd_sgd_bf16", 1000),
        ("t1t2_exact_donated_sgd_sgd_bf16", 10000),
        ("greedy_donated_sgd_sgd_bf16", 10000)]
    model = report["memory_model"]
    for r in rows:
        n = r["n_hyperparams"]
        assert (r["param_dtype"], r["hyper_dtype"], r["devices"]) == (
            "float32", "bfloat16", 1)
        assert (r["inner"], r["outer"], r["donate"]) == ("sgd", "sgd", True)
        assert r["finite"] is True
        # w (float32) and rho (bfloat16), no optimizer buffers; the rest
        # is the step counter and the metadata scalars
        extra = r["state_bytes"] - (4 * n + 2 * n)
        assert 0 <= extra < 256, (r["name"], extra)
        assert r["xla_argument_bytes"] >= r["state_bytes"]
        m = model[r["name"].replace("_donated", "")]
        assert (m["a"], m["b"], m["bytes_per_hyperparam"]) == (3, 2, 16)
        assert (m["hyper_itemsize"], m["param_itemsize"]) == (2, 4)
    assert report["accelerator_80gb"]["t1t2_exact_sgd_sgd_bf16"][
        "bytes_per_hyperparam"] == 16
    # merged: the stale row replaced, the others and top-level keys kept
    out = json.loads(merged.read_text())
    assert out["sharded_rows"] == {"kept": True}
    assert out["largest_size"] == 10 ** 8
    names = [(r["name"], r["n_hyperparams"]) for r in out["rows"]]
    assert names[:2] == [("t1t2_exact", 1000), ("t1t2_exact_4dev", 10 ** 6)]
    assert len(names) == 6 and len(set(names)) == 6
    assert not any(r.get("stale") for r in out["rows"])
    assert out["rows"][1]["devices"] == 4
    assert all(r["hyper_dtype"] in ("float32", "bfloat16")
               and r["param_dtype"] == "float32" for r in out["rows"])
    assert out["runs"][-1]["rows"] == ["greedy_donated_sgd_sgd_bf16",
                                       "t1t2_exact_donated_sgd_sgd_bf16"]
