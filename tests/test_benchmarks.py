"""Smoke test of benchmarks/step_cost.py (no timing assertions).

Runs the script in ``--quick`` mode in a subprocess, as a user would, and
checks the structure of the JSON report: every core row is there, times and
ratios are positive and finite, the baseline's ratio to itself is exactly 1
per round, and each library row is compared with its hand-written
counterpart.
"""

import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "step_cost.py")
CORE = ["plain", "two_grads", "hand_exact", "t1t2_exact", "hand_fd",
        "t1t2_fd"]


def _positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def _run(tmp_path, *args):
    out = tmp_path / "step_cost.json"
    proc = subprocess.run(
        [sys.executable, SCRIPT, "--quick", "--rounds", "3", "--out",
         str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "t1t2_exact" in proc.stdout  # the table was printed
    return json.loads(out.read_text())


def test_step_cost_quick_mlp(tmp_path):
    model = "mlp"
    report = _run(tmp_path, "--model", model, "--cases", ",".join(CORE))
    assert report["benchmark"] == "step_cost"
    assert report["base"] == "plain"
    assert report["config"]["model"] == model
    assert report["config"]["quick"] is True
    assert report["config"]["rounds"] == 3
    assert report["environment"]["jax"]
    assert set(report["goals"]) == {
        "t1t2_exact_vs_plain", "t1t2_fd_vs_plain",
        "library_vs_hand_written"}

    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == CORE
    for name, row in rows.items():
        assert _positive(row["median_seconds"]), name
        assert _positive(row["ratio_vs_base"]), name
    # each round's ratio of the baseline to itself is exactly one
    assert rows["plain"]["ratio_vs_base"] == 1.0
    for lib, hand in [("t1t2_exact", "hand_exact"), ("t1t2_fd", "hand_fd")]:
        row = rows[lib]
        assert row["reference"] == hand
        assert _positive(row["ratio_vs_reference"])
        assert isinstance(row["pass_vs_base"], bool)
        assert isinstance(row["pass_vs_reference"], bool)
    assert rows["t1t2_exact"]["goal_vs_base"] == 2.75
    assert rows["t1t2_fd"]["goal_vs_base"] == 3.0
    assert rows["t1t2_fd"]["goal_vs_reference"] == 1.1
    assert rows["hand_exact"]["ratio_vs_reference"] is None


def test_step_cost_quick_cnn(tmp_path):
    """The CNN option builds and times (a subset of rows, to stay short)."""
    report = _run(tmp_path, "--model", "cnn", "--cases",
                  "hand_exact,t1t2_exact")
    assert report["config"]["model"] == "cnn"
    rows = {r["name"]: r for r in report["rows"]}
    assert list(rows) == ["plain", "hand_exact", "t1t2_exact"]
    assert _positive(rows["t1t2_exact"]["ratio_vs_reference"])
    assert report["config"]["n_hyperparams"] > 0
