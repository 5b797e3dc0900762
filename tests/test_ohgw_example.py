"""End-to-end runs of examples/ohgw.py (the OHGW experiment, --quick)."""

import json
import math
import pathlib
import re
import sys

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("scipy")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import ohgw  # noqa: E402

VARIANTS = ("baseline", "ohgw1", "ohgw3", "random")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_run_reports_every_variant(tmp_path, capsys):
    ohgw.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "results.json").read_text())
    # the saved-files line and the verdict on the mean test accuracy
    saved = re.search(r"^Saved in (.+): (.+)$", out, re.M)
    assert saved and pathlib.Path(saved[1]) == tmp_path
    for name in saved[2].split(", "):
        assert (tmp_path / name).stat().st_size > 0
    means = {n: v["summary"]["final_test_accuracy"]["mean"]
             for n, v in result["variants"].items()}
    ranked = sorted(means.values(), reverse=True)
    verdict = re.search(r"^Verdict: (?:the baseline )?(.+?) (?:wins|and) "
                        r".*?(?:by|margin) ([0-9.]+)", out, re.M)
    assert verdict, out
    assert means[verdict[1]] == ranked[0]
    assert float(verdict[2]) == pytest.approx(ranked[0] - ranked[1],
                                              abs=5e-4)
    assert set(result["variants"]) == set(VARIANTS)
    for name, variant in result["variants"].items():
        assert len(variant["runs"]) == 2                       # paired seeds
        for run in variant["runs"].values():
            for key in ("t_at_target_seconds", "t_at_target_grad_evals",
                        "total_seconds", "total_grad_evals",
                        "best_val_accuracy", "final_test_accuracy",
                        "auc_time", "auc_grad_evals",
                        "overhead_time_share", "overhead_grad_share"):
                assert finite(run[key]), (name, key, run[key])
            assert 0.0 <= run["final_test_accuracy"] <= 1.0
            assert 0.0 <= run["overhead_grad_share"] < 1.0
            if name == "baseline":
                assert run["overhead_grad_share"] == 0.0
                assert run["statuses"] == ["none"]
            else:
                assert run["overhead_grad_share"] > 0.0
                assert set(run["statuses"]) <= {"applied", "clipped",
                                                "skipped_nonfinite"}
        for metric, test in variant["vs_baseline"].items():
            if metric == "kl_final_psi":
                assert (test["value"] is None) == (test["reason"] is not None)
                assert test["value"] is None or test["value"] >= 0.0
                continue
            p = test["p_value"]
            if p is None:
                assert test["reason"]
            else:
                assert 0.0 <= p <= 1.0
        if name != "baseline":
            assert "mean_reduction" in \
                variant["vs_baseline"]["t_at_target_grad_evals"]
    for png in ("accuracy_vs_time_per_variant.png",
                "accuracy_vs_time_all.png", "per_seed.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_wilcoxon_edge_cases():
    assert ohgw.wilcoxon([1.0], [2.0]) == (None, "too few pairs (1)")
    p, reason = ohgw.wilcoxon([1.0, 2.0, 3.0], [1.0, 2.0, 3.0])
    assert p is None and "zero" in reason
    p, reason = ohgw.wilcoxon([1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                              [2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    assert reason is None and p == pytest.approx(2 / 64)   # exact, n = 6


def test_two_workers_share_one_journal_study(tmp_path):
    """--workers 2 starts a second process on the same journal file; the
    one study holds all trials, from both processes."""
    journal = tmp_path / "ohgw.journal"
    result = ohgw.main(["--quick", "--variants", "baseline", "--seeds", "1",
                        "--trials", "6", "--storage", str(journal),
                        "--workers", "2", "--study-name", "shared",
                        "--out", str(tmp_path)])
    storage = ohgw.open_storage(str(journal))
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert names == ["shared-asha-baseline-seed0"]
    study = optuna.load_study(study_name=names[0], storage=storage)
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state.is_finished() for t in study.trials)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    run = result["variants"]["baseline"]["runs"]["0"]
    assert run["n_trials"] == 6 and run["workers"] == 2
