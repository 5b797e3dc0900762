"""End-to-end run of examples/pasha_resume.py (--quick): pausing PASHA with
warm starts against stopping PASHA and against no warm start.

The numbers in results.json are checked against the Optuna journal the run
left in --out, read back through a fresh storage object: units trained (each
once), where resumed chains continue, PASHA's top rung, the gradient
evaluations charged, and the row the verdict names.
"""

import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from optuna.storages.journal import (  # noqa: E402
    JournalFileBackend, JournalStorage)

import gradhpo as gh  # noqa: E402
from gradhpo.integrations.pasha import PASHAPruner  # noqa: E402
from gradhpo.integrations.resume import (  # noqa: E402
    CHAIN, START, STATUS)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "pasha_resume.py"
sys.path.insert(0, str(ROOT / "examples"))

import pasha_resume  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One --quick run: (out folder, results.json, stdout, journal)."""
    out = tmp_path_factory.mktemp("pasha_resume")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        pasha_resume.main(["--quick", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    return out, result, stdout.getvalue(), storage


def load(storage, row, args):
    pausing = row["method"].startswith("pausing")
    pruner = None if pausing else PASHAPruner(
        min_resource=1, reduction_factor=args["eta"],
        max_resource=args["max_resource"])
    return optuna.load_study(study_name=row["study"], storage=storage,
                             pruner=pruner)


def units_by_chain(study, pausing):
    """{chain: [unit, ...]} with one entry per unit record in the journal
    (a unit trained twice would appear twice)."""
    chains = {}
    for t in study.trials:
        chain = t.user_attrs[CHAIN] if pausing else t.number
        for key in t.user_attrs:
            if key.startswith("unit:"):
                chains.setdefault(chain, []).append(int(key[5:]))
    return chains


def test_quick_run_rows_and_files(run):
    out, result, stdout, _ = run
    assert [r["method"] for r in result["rows"]] == [
        "pausing", "stopping", "pausing-cold"]
    assert result["data"]["dataset"] == "scikit-learn digits"
    saved = re.search(r"^Saved in (.+): (.+)$", stdout, re.M)
    assert saved and pathlib.Path(saved[1]) == out
    for name in saved[2].split(", "):
        assert (out / name).stat().st_size > 0
    # the comparison is at one horizon: the smallest study total
    horizon = result["horizon_grad_evals"]
    assert horizon == min(r["whole_study"]["grad_evals"]
                          for r in result["rows"])
    for r in result["rows"]:
        assert r["grad_evals"] <= horizon + 1e-9
        assert r["units"] <= r["whole_study"]["units_trained"]
        assert r["top_rung"] <= r["whole_study"]["top_rung"]
        assert 0.0 <= r["test_acc"] <= 1.0
        assert (r["whole_study"]["warm_start_grad_evals"] > 0) == \
            r["warm_start"]


def test_units_trained_once_and_charged(run):
    """Units trained = the sum over chains of their distinct units, read
    from the journal; G = units * steps-per-unit + the warm starts."""
    _, result, _, storage = run
    args = result["args"]
    resumed = 0
    for row in result["rows"]:
        pausing = row["method"].startswith("pausing")
        study = load(storage, row, args)
        chains = units_by_chain(study, pausing)
        distinct = sum(len(set(units)) for units in chains.values())
        records = sum(len(units) for units in chains.values())
        whole = row["whole_study"]
        assert records == distinct                 # no unit trained twice
        assert whole["units_trained"] == distinct
        assert whole["distinct_units"] == distinct
        for units in chains.values():              # 1..k, no gap
            assert sorted(units) == list(range(1, max(units) + 1))
        warm = sum(t.user_attrs["warm_start"]["grad_evals"]
                   for t in study.trials if "warm_start" in t.user_attrs)
        assert warm == pytest.approx(whole["warm_start_grad_evals"])
        assert whole["grad_evals"] == pytest.approx(
            distinct * args["steps_per_unit"] + warm)
        # one warm start per configuration, none for a continuation
        if row["warm_start"]:
            heads = [t for t in study.trials if "warm_start" in t.user_attrs]
            assert len(heads) == len(chains)
            assert all(t.user_attrs.get("gradhpo:parent") is None
                       for t in heads)
        resumed += whole["pauses_resumed"]
    assert resumed > 0           # the quick run does pause and resume


def test_resumed_chains_continue_after_the_paused_unit(run):
    _, result, _, storage = run
    args = result["args"]
    sched = gh.PausingScheduler(1, args["eta"],
                                max_resource=args["max_resource"])
    for row in result["rows"]:
        if not row["method"].startswith("pausing"):
            continue
        study = load(storage, row, args)
        listed = {c["chain"]: c for c in row["chains"]}
        for chain in sched.chains(study):
            segments = chain.segments
            for before, after in zip(segments, segments[1:]):
                paused = before.last_step
                assert before.user_attrs[STATUS] == "paused"
                assert paused in sched.rung_levels
                assert after.user_attrs[START] == paused
                first = min(int(k[5:]) for k in after.user_attrs
                            if k.startswith("unit:"))
                assert first == paused + 1
            # results.json lists the same segments
            mine = listed[chain.number]["segments"]
            assert [s["trial"] for s in mine] == \
                [s.number for s in segments]
            for a, b in zip(mine, mine[1:]):
                assert b["first"] == a["last"] + 1 == b["start"] + 1


def test_top_rung_is_the_journal_s(run):
    _, result, _, storage = run
    args = result["args"]
    sched = gh.PausingScheduler(1, args["eta"],
                                max_resource=args["max_resource"])
    for row in result["rows"]:
        study = load(storage, row, args)
        if row["method"].startswith("pausing"):
            top = sched.current_top_rung(study)
            assert row["whole_study"]["max_resource"] == \
                sched.current_max_resource(study)
        else:
            top = study.pruner.current_top_rung(study)
        assert row["whole_study"]["top_rung"] == top


def test_verdict_names_the_best_row(run):
    _, result, stdout, _ = run
    rows = result["rows"]
    best = max(r["test_acc"] for r in rows)
    line = re.search(r"^Verdict: (\S+) (wins on|and (\S+) tie on) .*?"
                     r"(?:by|margin) ([0-9.]+)", stdout, re.M)
    assert line, stdout
    assert line[0] in result["verdict"]
    named = {r["method"]: r["test_acc"] for r in rows}
    assert named[line[1]] == best
    ranked = sorted(named.values(), reverse=True)
    assert float(line[4]) == pytest.approx(ranked[0] - ranked[1], abs=5e-5)


def test_help_is_fast_and_lists_every_flag():
    flags = [s for a in pasha_resume.build_parser()._actions
             for s in a.option_strings if s.startswith("--")]
    assert {"--quick", "--seed", "--out", "--workers", "--warm-start",
            "--no-warm-start", "--budget", "--data-dir"} <= set(flags)
    best = None
    for _ in range(3):          # the best of three: a loaded machine
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", str(SCRIPT), "--help"],
            capture_output=True, text=True, timeout=60,
            env=dict(os.environ, JAX_PLATFORMS="cpu"))
        elapsed = time.perf_counter() - start
        best = elapsed if best is None else min(best, elapsed)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert best < 1.0, best
    for flag in flags:
        assert flag in proc.stdout, flag
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0]
                for line in proc.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "argparse" in imported
    assert not imported & {"jax", "optuna", "gradhpo", "numpy", "tqdm",
                           "matplotlib"}


def test_quick_keeps_the_flags_given():
    quick = pasha_resume.QUICK
    args = pasha_resume.parse_args(["--quick", "--budget", "7",
                                    "--hidden", "16"])
    assert (args.budget, args.hidden) == (7, 16)
    assert (args.max_resource, args.steps_per_unit, args.batch_size) == (
        quick["max_resource"], quick["steps_per_unit"], quick["batch_size"])
    assert args.data_dir is None                  # --quick: digits
    args = pasha_resume.parse_args(["--quick", "--data-dir", "somewhere",
                                    "--max-resource", "27"])
    assert (args.data_dir, args.max_resource) == ("somewhere", 27)
    normal = pasha_resume.parse_args([])
    assert {k: getattr(normal, k) for k in pasha_resume.NORMAL} == \
        pasha_resume.NORMAL
    args = pasha_resume.parse_args(["--no-warm-start"])
    assert args.method_list == ["pausing", "stopping"]


def test_a_second_invocation_continues_the_study(run, tmp_path):
    """Rerun on a copy of --out with a larger budget: the first run's trials
    are kept as they were, paused chains can resume from their checkpoints,
    and still no unit is trained twice; other settings are refused."""
    out, result, _, _ = run
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    args = result["args"]
    with pytest.raises(SystemExit, match="--hidden 32 \\(now 16\\)"):
        pasha_resume.main(["--quick", "--methods", "pausing", "--hidden",
                           "16", "--out", str(copy)])
    before = load(JournalStorage(JournalFileBackend(
        str(copy / "study.journal"))), result["rows"][0], args)
    old = {t.number: dict(t.user_attrs) for t in before.trials}
    budget = args["budget"] + 8
    with contextlib.redirect_stdout(io.StringIO()):
        again = pasha_resume.main(["--quick", "--methods", "pausing",
                                   "--budget", str(budget), "--out",
                                   str(copy)])
    storage = JournalStorage(JournalFileBackend(str(copy / "study.journal")))
    study = load(storage, again["rows"][0], args)
    for t in study.trials:
        if t.number in old:
            assert t.user_attrs == old[t.number]
    chains = units_by_chain(study, pausing=True)
    distinct = sum(len(set(units)) for units in chains.values())
    assert sum(len(units) for units in chains.values()) == distinct
    whole = again["rows"][0]["whole_study"]
    assert whole["units_trained"] == distinct > len(
        [k for a in old.values() for k in a if k.startswith("unit:")])
    assert whole["grad_evals"] >= budget * args["steps_per_unit"]
