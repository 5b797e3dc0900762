"""Smoke test of benchmarks/step_cost.py (no timing assertions).

Runs the script in ``--quick`` mode in a subprocess, as a user would, and
checks the structure of the JSON report: every core row is there, times and
ratios are positive and finite, the baseline's ratio to itself is exactly 1
per round, and each library row is compared with its hand-written
counterpart. A second test checks, in process on a tiny problem, that every
hand-written row computes what its library row does (otherwise its ratio
would be meaningless).
"""

import importlib.util
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
        "greedy_per_inner_step_vs_plain", "hyperdistill_vs_plain",
        "warm_start_total_vs_plain", "forward_mode_per_inner_step_vs_plain",
        "forward_mode_vs_plain_rule", "vs_plain_goals_apply_to",
        "library_vs_hand_written"}
    # ForwardMode's problem: one L2 per weight matrix, log lr and momentum
    assert report["config"]["forward_mode"]["d"] == 5
    assert report["goals"]["forward_mode_per_inner_step_vs_plain"] == 7.8
    assert report["config"]["implicit"]["terms"] == 10
    # the equivalence check ran before timing, on both core pairs
    assert set(report["equivalence"]) == {"t1t2_exact~hand_exact",
                                          "t1t2_fd~hand_fd"}
    assert all(v["ok"] for v in report["equivalence"].values())

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


def _load_step_cost():
    spec = importlib.util.spec_from_file_location("step_cost", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hand_written_rows_compute_the_library_maths():
    """Each hand-written row of the optional algorithms gives the library's
    hypergradient, hyperparameters and weights (float32, rtol 1e-4) over two
    calls, on a tiny MLP; a hand-written row with another discount, or a CG
    solve with one iteration fewer, is caught. (The T1-T2 pairs are checked
    by the quick run above.) About 25 s on two cores: the cost is
    compiling each step and hypergradient once."""
    sc = _load_step_cost()
    found = sc.optional_modules()
    if not any(found.values()):
        return
    pb = sc.problem_from_args(sc.parse_args(
        ["--quick", "--hidden", "16", "--batch", "8"]))
    registry = sc.cases(horizon=2, lookahead=1, model="mlp",
                        n_weights=len(pb.params))
    # (the unrolled greedy row is checked by every full run of the script)
    pairs = [p for p in sc.check_pairs(registry)
             if not p[0].startswith("t1t2") and p not in sc.EXTRA_CHECKS]
    wanted = {name for pair in pairs for name in pair}
    prebuilt = sc.prebuild([c for c in registry if c.name in wanted], pb)
    results = sc.check_equivalence(prebuilt, pairs, steps=2, rtol=1e-4,
                                   log=lambda line: None)
    expected = set()
    if found["greedy"]:
        expected |= {"greedy~hand_greedy",
                     "greedy_unrolled~hand_greedy_unrolled"}
    if found["online"]:
        expected.add("hyperdistill~hand_hyperdistill")
    if found["warm_start"]:
        expected.add("warm_start~hand_warm_start")
    if found["forward_mode"]:
        expected |= {"forward_mode~hand_forward_mode",
                     "hand_forward_mode_guarded~hand_forward_mode"}
    if found["implicit"]:
        expected |= {"implicit~hand_implicit",
                     "implicit_neumann~hand_implicit_neumann"}
    assert set(results) == expected
    for name, res in results.items():
        assert res["ok"], (name, res)

    if found["greedy"]:
        # negative control: the check is not vacuous
        prebuilt["hand_gamma_0.5"] = sc.build_hand_greedy(2, 0.5)(pb)
        wrong = sc.check_equivalence(
            prebuilt, [("greedy", "hand_gamma_0.5")], log=lambda line: None)
        assert not wrong["greedy~hand_gamma_0.5"]["ok"]
    if found["implicit"]:
        # ... nor blind to the number of Hessian-vector products
        prebuilt["hand_cg_9"] = sc.build_hand_implicit(
            "cg", sc.IMPLICIT_TERMS - 1, sc.IMPLICIT_DAMPING)(pb)
        wrong = sc.check_equivalence(
            prebuilt, [("implicit", "hand_cg_9")], log=lambda line: None)
        assert not wrong["implicit~hand_cg_9"]["ok"]
