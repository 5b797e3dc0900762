"""The main example: quick end-to-end run, real MNIST files, and bit-exact
resume after SIGKILL."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MNIST_DIR = ROOT.parent / "shared" / "data" / "mnist"
sys.path.insert(0, str(ROOT / "examples"))
from example_checks import check_saved_line, check_verdict  # noqa: E402


def test_quick_run_table_and_plots(tmp_path, capsys):
    import mnist
    rows = mnist.main(["--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    by_name = {r[0]: r for r in rows}
    assert set(by_name) == {"T1-T2", "Greedy", "HyperDistill", "untuned",
                            "random search"}
    # the library's own count: 48 steps of 4 G (T1-T2, Greedy per inner
    # step) or 5 G (HyperDistill); random search gets the largest budget
    assert by_name["T1-T2"][3] == by_name["Greedy"][3] == 48 * 4
    assert by_name["HyperDistill"][3] == 48 * 5
    assert 48 * 5 - 2 <= by_name["random search"][3] <= 48 * 5
    assert by_name["untuned"][3] == 48
    # every gradient-based method beats the untuned hyperparameters
    for m in ["T1-T2", "Greedy", "HyperDistill"]:
        assert by_name[m][1] < by_name["untuned"][1], rows
    results = json.loads((tmp_path / "results.json").read_text())
    curve = results["curves"]["T1-T2"]
    # from the initial values (0 G), then a point every 8 steps of 4 G
    assert [c["grad_evals"] for c in curve] == [0] + list(range(32, 193, 32))
    assert curve[0]["log_lr"] == pytest.approx(np.log(0.02))
    assert curve[-1]["log_lr"] != pytest.approx(np.log(0.02))
    # every baseline is in the plots: untuned has its own curve (1 G a step)
    untuned = results["curves"]["untuned"]
    assert [c["grad_evals"] for c in untuned] == list(range(0, 49, 8))
    assert untuned[0] == curve[0]
    assert results["curves"]["random search"][0] == curve[0]
    # where the files are, and who won by how much on test accuracy
    assert check_saved_line(out, ["results.json", "val_loss.png",
                                  "hyperparameters.png"]) == tmp_path
    check_verdict(out, results["rows"], "test_acc")
    assert out.rstrip().splitlines()[-1].startswith("Verdict: ")

    # the plots: one colour per method in every panel of both figures,
    # every curve from 0 gradient evaluations
    args = mnist.parse_args(["--quick", "--out", str(tmp_path)])
    figures = mnist.plot(results["curves"], args)
    assert set(figures) == {"val_loss.png", "hyperparameters.png"}
    seen = {}
    for figure in figures.values():
        for ax in figure.axes:
            assert ax.get_xlabel() == "gradient evaluations (G)"
            for line in ax.get_lines():
                method = line.get_gid()
                assert method, "every line names its method"
                method = method.replace(" trials", "")
                seen.setdefault(method, set()).add(line.get_color())
                if not line.get_gid().endswith(" trials"):
                    assert line.get_xdata()[0] == 0, method
    assert set(seen) == set(results["curves"])
    assert all(len(colours) == 1 for colours in seen.values()), seen
    assert len({c for colours in seen.values() for c in colours}) == \
        len(seen)                                   # and they all differ
    assert figures["val_loss.png"].axes[0].get_title()
    assert "digits" in figures["hyperparameters.png"].get_suptitle()
    # "geometric mean" only where a layer has many penalties
    assert "geometric" not in figures["hyperparameters.png"].axes[0] \
        .get_ylabel()


@pytest.mark.skipif(not MNIST_DIR.exists(), reason="no shared MNIST files")
def test_runs_on_the_real_mnist_test_files(tmp_path, capsys):
    import mnist
    rows = mnist.main(["--quick", "--data-dir", str(MNIST_DIR),
                       "--methods", "T1-T2", "--out", str(tmp_path)])
    assert "test" in capsys.readouterr().out.lower()
    assert rows[0][0] == "T1-T2" and 0.0 < rows[0][2] <= 1.0


def _run(args, **kwargs):
    env = dict(os.environ, MPLBACKEND="Agg", JAX_PLATFORMS="cpu")
    script = str(ROOT / "examples" / "mnist.py")
    return subprocess.Popen([sys.executable, script] + args,
                            env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kwargs)


def _arrays(path):
    with np.load(path) as f:
        return {k: f[k].tobytes() for k in f.files}


@pytest.mark.parametrize("method", ["T1-T2", "HyperDistill"])
def test_sigkill_then_resume_is_bit_exact(tmp_path, method):
    # --quick: 48 steps, a curve record every 8
    common = ["--quick", "--methods", method, "--checkpoint-every", "5"]
    ref_dir, dir_ = tmp_path / "ref", tmp_path / "killed"
    ref = _run(common + ["--checkpoint-dir", str(ref_dir),
                         "--out", str(tmp_path / "o1")])
    victim = _run(common + ["--checkpoint-dir", str(dir_),
                            "--out", str(tmp_path / "o2")])
    # a checkpoint is a folder METHOD.step-N with state.npz and run.json
    deadline = time.time() + 240
    while not list(dir_.glob(f"{method}.step-*")) and time.time() < deadline:
        time.sleep(0.01)
    assert list(dir_.glob(f"{method}.step-*")), victim.communicate()[0]
    time.sleep(0.03)   # a few more steps, mid-run (--quick: 48 in ~0.3 s)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    import gradhpo as gh  # noqa: F401  (checkpoint readable on its own)
    for folder in dir_.glob(f"{method}.step-*"):
        with np.load(folder / "state.npz") as f:
            assert f.files                # not torn by the kill
        run = json.loads((folder / "run.json").read_text())
        assert run["step"] == int(folder.name.split("-")[-1])
    resumed = _run(common + ["--checkpoint-dir", str(dir_), "--resume",
                             "--out", str(tmp_path / "o2")])
    out = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, out
    assert f"resuming {method}" in out
    step = int(out.split("at step ")[1].split()[0])
    assert 0 < step < 48, "the kill must land mid-run (--quick: 48 steps)"
    assert ref.communicate(timeout=300)[0] and ref.returncode == 0
    name = f"{method}.step-00000048"
    assert [p.name for p in dir_.iterdir()] == [name]
    assert _arrays(dir_ / name / "state.npz") == \
        _arrays(ref_dir / name / "state.npz")
    # the curve resumed too: one record per 8 steps (--quick)
    run = json.loads((dir_ / name / "run.json").read_text())
    assert len(run["curve"]) == 6
    assert run == json.loads((ref_dir / name / "run.json").read_text())
