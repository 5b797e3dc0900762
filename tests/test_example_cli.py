"""The examples' command lines: bad flag values are usage errors (exit
status 2, a message naming the flag, the value and what is allowed), valid
ones keep their defaults, and mnist.py's checkpoints are one atomic unit
that a resume with other settings refuses."""

import importlib
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

#: Optional dependencies of some examples (skipped when missing).
NEEDS = {"ohgw": ("optuna", "scipy", "flax"), "cifar10": ("flax",)}

POS_INT = r"must be a positive integer \(>= 1\); got '{}'"

# (example, argv, regex the error message must match)
BAD = [
    # mnist.py: the measured crashes and silent errors
    ("mnist", ["--checkpoint-every", "0"],
     r"argument --checkpoint-every: " + POS_INT.format("0")),
    ("mnist", ["--eval-every", "0"],
     r"argument --eval-every: " + POS_INT.format("0")),
    ("mnist", ["--random-trials", "0"],
     r"argument --random-trials: " + POS_INT.format("0")),
    ("mnist", ["--hidden", "0"], r"argument --hidden: " + POS_INT.format("0")),
    ("mnist", ["--methods", "foo"],
     r"argument --methods: unknown method 'foo'.*T1-T2, Greedy, "
     r"HyperDistill, untuned, random"),
    ("mnist", ["--methods", ","],
     r"argument --methods: must name at least one method"),
    ("mnist", ["--batch-size", "0"],
     r"argument --batch-size: " + POS_INT.format("0")),
    ("mnist", ["--steps", "-5"], r"argument --steps: " + POS_INT.format("-5")),
    ("mnist", ["--steps", "1.5"],
     r"argument --steps: " + POS_INT.format(r"1\.5")),
    ("mnist", ["--outer-lr", "nan"],
     r"argument --outer-lr: must be a finite number > 0; got 'nan'"),
    ("mnist", ["--init-log-lr", "inf"],
     r"argument --init-log-lr: must be a finite number; got 'inf'"),
    ("mnist", ["--gamma", "1.5"],
     r"argument --gamma: must be a finite number in \[0, 1\]; got '1.5'"),
    ("mnist", ["--horizon", "0"],
     r"argument --horizon: " + POS_INT.format("0")),
    ("mnist", ["--seed", "-1"],
     r"argument --seed: must be an integer in \[0, 2\*\*32 - 1\]; "
     r"got '-1'"),
    ("mnist", ["--max-train", "-1"],
     r"argument --max-train: must be an integer >= 0; got '-1'"),
    ("mnist", ["--resume"], r"--resume needs --checkpoint-dir"),
    # quickstart.py
    ("quickstart", ["--steps", "0"],
     r"argument --steps: " + POS_INT.format("0")),
    ("quickstart", ["--batch-size", "401"],
     r"argument --batch-size: must be an integer in \[1, 400\]; got '401'"),
    ("quickstart", ["--init-log-l2", "nan"],
     r"argument --init-log-l2: must be a finite number; got 'nan'"),
    ("quickstart", ["--seed", "x"],
     r"argument --seed: must be an integer in .*; got 'x'"),
    # cifar10.py
    ("cifar10", ["--init-smoothing", "0.5"],
     r"argument --init-smoothing: must be a finite number in \(0, 0.5\); "
     r"got '0.5'"),
    ("cifar10", ["--init-wd", "0"],
     r"argument --init-wd: must be a finite number > 0; got '0'"),
    ("cifar10", ["--init-magnitude", "1"],
     r"argument --init-magnitude: must be a finite number in \(0, 1\); "
     r"got '1'"),
    ("cifar10", ["--width", "0"], r"argument --width: " + POS_INT.format("0")),
    ("cifar10", ["--eval-every", "0"],
     r"argument --eval-every: " + POS_INT.format("0")),
    ("cifar10", ["--eval-size", "-1"],
     r"argument --eval-size: must be an integer >= 0; got '-1'"),
    # augmentation.py
    ("augmentation", ["--grid", "0.2,1.5"],
     r"argument --grid: every item must be a finite number in \(0, 1\]; "
     r"got '1.5'"),
    ("augmentation", ["--methods", "T1-T2,Greedy"],
     r"argument --methods: unknown method 'Greedy'.*T1-T2, HyperDistill"),
    ("augmentation", ["--max-noise", "-0.1"],
     r"argument --max-noise: must be a finite number >= 0; got '-0.1'"),
    ("augmentation", ["--lr", "0"],
     r"argument --lr: must be a finite number > 0; got '0'"),
    ("augmentation", ["--eval-every", "0"],
     r"argument --eval-every: " + POS_INT.format("0")),
    # lr_tuning.py
    ("lr_tuning", ["--init-momentum", "1"],
     r"argument --init-momentum: must be a finite number in \(0, 1\); "
     r"got '1'"),
    ("lr_tuning", ["--grid", "0.1,-0.3"],
     r"argument --grid: every item must be a finite number > 0; "
     r"got '-0.3'"),
    ("lr_tuning", ["--grid", ""], r"argument --grid: must be a non-empty"),
    ("lr_tuning", ["--horizon", "0"],
     r"argument --horizon: " + POS_INT.format("0")),
    ("lr_tuning", ["--weight-decay", "nan"],
     r"argument --weight-decay: must be a finite number >= 0; got 'nan'"),
    ("lr_tuning", ["--steps", "25", "--horizon", "10"],
     r"--steps \(25\) must be a multiple of --horizon \(10\)"),
    # hyper_cleaning.py
    ("hyper_cleaning", ["--corrupt", "0"],
     r"argument --corrupt: must be a finite number in \(0, 1\); got '0'"),
    ("hyper_cleaning", ["--momentum", "1"],
     r"argument --momentum: must be a finite number in \[0, 1\); got '1'"),
    ("hyper_cleaning", ["--hidden", "-1"],
     r"argument --hidden: must be an integer >= 0; got '-1'"),
    ("hyper_cleaning", ["--batch-size", "0"],
     r"argument --batch-size: " + POS_INT.format("0")),
    ("hyper_cleaning", ["--inner-lr=-inf"],
     r"argument --inner-lr: must be a finite number > 0; got '-inf'"),
    # ohgw.py (and the transformer sizes of lm.py, which has no CLI)
    ("ohgw", ["--trials", "0"], r"argument --trials: " + POS_INT.format("0")),
    ("ohgw", ["--batch-size", "0"],
     r"argument --batch-size: " + POS_INT.format("0")),
    ("ohgw", ["--eta", "0"],
     r"argument --eta: must be a finite number > 0; got '0'"),
    ("ohgw", ["--lookahead", "0"],
     r"argument --lookahead: " + POS_INT.format("0")),
    ("ohgw", ["--variants", "foo"],
     r"argument --variants: unknown variant 'foo'.*baseline, ohgw1, ohgw3, "
     r"random"),
    ("ohgw", ["--workers", "0"], r"argument --workers: " + POS_INT.format("0")),
    ("ohgw", ["--seeds", "0"], r"argument --seeds: " + POS_INT.format("0")),
    ("ohgw", ["--max-reports", "0"],
     r"argument --max-reports: " + POS_INT.format("0")),
    ("ohgw", ["--target", "1.5"],
     r"argument --target: must be a finite number in \(0, 1\]; got '1.5'"),
    ("ohgw", ["--task", "language", "--target", "0.9"],
     r"--target \(an accuracy\) is for --task vision; use --target-ppl"),
    ("ohgw", ["--task", "language", "--target-ppl", "0.5"],
     r"argument --target-ppl: must be a finite number >= 1; got '0.5'"),
    ("ohgw", ["--task", "language", "--token-noise", "1"],
     r"argument --token-noise: must be a finite number in \[0, 1\); "
     r"got '1'"),
    ("ohgw", ["--task", "language", "--heads", "3"],
     r"--d-model \(64\) must be divisible by --heads \(3\)"),
    ("ohgw", ["--task", "language", "--context", "0"],
     r"argument --context: " + POS_INT.format("0")),
    ("ohgw", ["--steps-per-report", "0"],
     r"argument --steps-per-report: " + POS_INT.format("0")),
    ("ohgw", ["--hidden", "0"], r"argument --hidden: " + POS_INT.format("0")),
    ("ohgw", ["--seed", "4294967295", "--seeds", "2"],
     r"--seed 4294967295 with --seeds 2 goes past the largest seed"),
]


def _example(name):
    for dependency in NEEDS.get(name, ()):
        pytest.importorskip(dependency)
    return importlib.import_module(name)


@pytest.mark.parametrize("name,argv,message", BAD,
                         ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD])
def test_bad_flag_is_a_usage_error(name, argv, message, capsys):
    module = _example(name)
    with pytest.raises(SystemExit) as info:
        module.parse_args(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "error:" in err
    assert re.search(message, err), err


def test_the_table_covers_every_example():
    assert len(BAD) >= 25
    assert {n for n, _, _ in BAD} == {"mnist", "quickstart", "cifar10",
                                      "augmentation", "lr_tuning",
                                      "hyper_cleaning", "ohgw"}


def test_defaults_and_valid_edge_values_are_unchanged():
    mnist = _example("mnist")
    args = mnist.parse_args([])
    assert (args.steps, args.batch_size, args.hidden, args.random_trials,
            args.eval_every, args.checkpoint_every, args.seed) == \
        (1200, 64, 128, 6, 50, 100, 0)
    assert args.methods == "T1-T2,Greedy,HyperDistill,untuned,random"
    assert args.init_log_lr == pytest.approx(np.log(0.02))
    assert mnist.parse_args(["--methods", "Greedy, random"]).methods == \
        "Greedy,random"
    quick = mnist.parse_args(["--quick"])
    assert (quick.steps, quick.eval_every, quick.max_train) == (48, 8, 300)
    assert _example("quickstart").parse_args([]).batch_size == 64
    aug = _example("augmentation").parse_args([])
    assert aug.grid_values == [0.2, 0.5, 0.8]
    assert aug.method_list == ["T1-T2", "HyperDistill"]
    assert _example("lr_tuning").parse_args([]).grid == "0.01,0.03,0.1,0.3"
    hc = _example("hyper_cleaning").parse_args(
        ["--hidden", "0", "--val-batch-size", "0", "--max-train", "0"])
    assert (hc.hidden, hc.val_batch_size, hc.corrupt) == (0, 0, 0.3)
    cifar = _example("cifar10").parse_args(["--eval-size", "0"])
    assert (cifar.steps, cifar.init_smoothing, cifar.eval_size) == \
        (5000, 0.05, 0)


def test_lm_config_refuses_nonpositive_sizes():
    pytest.importorskip("flax")
    lm = importlib.import_module("lm")
    with pytest.raises(ValueError, match="heads must be a positive"):
        lm.LMConfig(heads=0)
    assert lm.LMConfig().heads == 4


def test_script_exits_2_with_the_message():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "mnist.py"),
         "--checkpoint-every", "0"], env=env, capture_output=True,
        text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "argument --checkpoint-every: must be a positive integer" \
        in proc.stderr


# -- mnist.py: checkpoints and resume ----------------------------------------

TINY = ["--methods", "T1-T2", "--steps", "12", "--eval-every", "4",
        "--checkpoint-every", "4", "--hidden", "8", "--max-train", "100",
        "--batch-size", "16"]
FINAL = "T1-T2.step-00000012"


class Killed(Exception):
    """Stands for a SIGKILL between writing the state and the records."""


def _arrays(path):
    with np.load(path) as f:
        return {k: f[k].tobytes() for k in f.files}


def _visible(directory):
    return sorted(p.name for p in directory.iterdir()
                  if not p.name.startswith("."))


def test_mnist_kill_between_state_and_records_then_resume(
        tmp_path, monkeypatch, capsys):
    mnist = _example("mnist")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ref_dir, ckpt = tmp_path / "ref", tmp_path / "ckpt"
    ref_rows = mnist.main(TINY + ["--checkpoint-dir", str(ref_dir),
                                  "--out", str(tmp_path / "o1")])
    assert _visible(ref_dir) == [FINAL]     # older checkpoints removed

    real, writes = mnist._write_records, []

    def killed_at_the_second(path, records):
        writes.append(path)
        if len(writes) == 2:
            raise Killed
        real(path, records)
    monkeypatch.setattr(mnist, "_write_records", killed_at_the_second)
    with pytest.raises(Killed):
        mnist.main(TINY + ["--checkpoint-dir", str(ckpt),
                           "--out", str(tmp_path / "o2")])
    monkeypatch.setattr(mnist, "_write_records", real)
    # the complete checkpoint of step 4 is there; the state of step 8
    # never got a name without its records
    assert _visible(ckpt) == ["T1-T2.step-00000004"]
    torn = [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]
    assert len(torn) == 1 and (torn[0] / "state.npz").exists()
    assert not (torn[0] / "run.json").exists()
    capsys.readouterr()

    rows = mnist.main(TINY + ["--checkpoint-dir", str(ckpt), "--resume",
                              "--out", str(tmp_path / "o2")])
    out = capsys.readouterr().out
    assert re.search(r"resuming T1-T2 from \S+T1-T2\.step-00000004 at "
                     r"step 4", out), out
    assert os.listdir(ckpt) == [FINAL]      # the torn folder removed too
    # bit-for-bit the uninterrupted run: state, curve and table
    assert _arrays(ckpt / FINAL / "state.npz") == \
        _arrays(ref_dir / FINAL / "state.npz")
    run = json.loads((ckpt / FINAL / "run.json").read_text())
    ref_run = json.loads((ref_dir / FINAL / "run.json").read_text())
    assert run == ref_run and len(run["curve"]) == 3
    assert [r[:4] for r in rows] == [r[:4] for r in ref_rows]

    # another seed (or other settings) must not resume this run
    with pytest.raises(SystemExit) as info:
        mnist.main(TINY + ["--checkpoint-dir", str(ckpt), "--resume",
                           "--seed", "1", "--gamma", "0.5",
                           "--out", str(tmp_path / "o3")])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--seed 0 in the checkpoint, 1 now" in err, err
    assert "--gamma" not in err    # T1-T2 does not use it
    with pytest.raises(SystemExit):
        mnist.main(TINY + ["--checkpoint-dir", str(ckpt), "--resume",
                           "--steps", "16", "--out", str(tmp_path / "o3")])
    assert "--steps 12 in the checkpoint, 16 now" in capsys.readouterr().err
    assert not (tmp_path / "o3").exists()  # refused before any work


def test_mnist_resume_is_not_blocked_by_an_older_partial_checkpoint(
        tmp_path, monkeypatch, capsys):
    """Older versions wrote NAME.npz, then NAME.json: a kill in between
    made every later --resume fail with FileNotFoundError."""
    mnist = _example("mnist")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "T1-T2.npz").write_bytes(b"state of an older version")
    mnist.main(TINY + ["--steps", "4", "--checkpoint-dir", str(ckpt),
                       "--resume", "--out", str(tmp_path / "o")])
    out = capsys.readouterr().out
    assert "not resuming from" in out and "T1-T2 starts over" in out
    assert (ckpt / "T1-T2.step-00000004" / "run.json").exists()


# -- fast --help, --quick defaults, progress bars ----------------------------

#: Every script in examples/ (the examples and their support modules).
SCRIPTS = sorted(p.stem for p in (ROOT / "examples").glob("*.py"))
HEAVY = ("jax", "jaxlib", "optax", "flax", "gradhpo", "optuna", "tqdm")


def _imported(importtime_log):
    """Top-level module names in a ``python -X importtime`` log."""
    names = set()
    for line in importtime_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_answers_before_importing_jax(name):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime",
         str(ROOT / "examples" / f"{name}.py"), "--help"],
        env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:"), proc.stdout
    imported = _imported(proc.stderr)
    assert "argparse" in imported          # the log is read correctly
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_usage_error_answers_before_importing_jax():
    proc = subprocess.run(
        [sys.executable, "-X", "importtime",
         str(ROOT / "examples" / "ohgw.py"), "--trials", "0"],
        capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "argument --trials: must be a positive integer" in proc.stderr
    assert "jax" not in _imported(proc.stderr)


def test_support_modules_explain_themselves_without_flags():
    for name in ("common", "lm", "data_utils", "text_utils"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "examples" / f"{name}.py")],
            capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "support module" in proc.stdout


# (example, argv, {attribute: value}): an explicit flag wins over --quick,
# the flags not given still get the --quick defaults.
QUICK = [
    ("mnist", ["--quick", "--steps", "100"],
     {"steps": 100, "eval_every": 8, "random_trials": 2, "max_train": 300}),
    ("mnist", ["--quick", "--eval-every", "50", "--random-trials", "6",
               "--max-train", "0"],
     {"steps": 48, "eval_every": 50, "random_trials": 6, "max_train": 0}),
    ("lr_tuning", ["--quick", "--steps", "40", "--horizon", "10",
                   "--grid", "0.1"],
     {"steps": 40, "horizon": 10, "grid": "0.1", "eval_every": 20}),
    ("hyper_cleaning", ["--quick", "--steps", "50"],
     {"steps": 50, "max_train": 500}),
    ("augmentation", ["--quick", "--steps", "7", "--hidden", "8"],
     {"steps": 7, "hidden": 8, "eval_every": 10, "max_train": 300}),
    ("cifar10", ["--quick", "--steps", "9", "--outer-lr", "0.01"],
     {"steps": 9, "outer_lr": 0.01, "width": 4, "eval_size": 0}),
    ("quickstart", ["--quick", "--steps", "30"], {"steps": 30}),
    ("quickstart", ["--quick"], {"steps": 100}),
    ("ohgw", ["--quick", "--trials", "20", "--seeds", "3"],
     {"trials": 20, "seeds": 3, "max_reports": 9}),
    ("ohgw", ["--task", "language", "--quick", "--heads", "4",
              "--d-model", "64", "--eval-tokens", "0"],
     {"heads": 4, "d_model": 64, "eval_tokens": 0, "layers": 1,
      "lookahead": 1, "batch_size": 8}),
]


@pytest.mark.parametrize("name,argv,expected", QUICK,
                         ids=[f"{n}:{' '.join(a)}" for n, a, _ in QUICK])
def test_quick_changes_only_the_flags_not_given(name, argv, expected):
    args = _example(name).parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


def test_defaults_without_quick_are_unchanged():
    assert _example("lr_tuning").parse_args([]).horizon == 10
    assert _example("cifar10").parse_args([]).outer_lr == 0.01
    ohgw = _example("ohgw")
    lang = ohgw.parse_args(["--task", "language"])
    assert (lang.eval_tokens, lang.ood_tokens, lang.width) == \
        (16384, 65536, 16)


def test_ohgw_language_defaults_are_lm_small():
    ohgw = _example("ohgw")
    small = importlib.import_module("lm").SMALL
    args = ohgw.parse_args(["--task", "language"])
    assert (args.layers, args.d_model, args.heads, args.context) == \
        (small.depth, small.width, small.heads, small.context)


def test_common_keeps_the_argparse_type_names():
    pytest.importorskip("sklearn")
    common, cli = _example("common"), importlib.import_module("cli")
    for name in ("int_in", "float_in", "positive_int", "seed_int",
                 "fraction", "name_list", "number_list", "open_fraction"):
        assert getattr(common, name) is getattr(cli, name)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(monkeypatch):
    cli = importlib.import_module("cli")
    log = io.StringIO()
    bar = cli.progress(range(3), file=log)
    assert bar.disable and list(bar) == [0, 1, 2]
    assert log.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())   # CI, a pipe
    assert cli.progress(range(3)).disable
    terminal = _Terminal()
    bar = cli.progress(range(3), file=terminal, mininterval=0)
    assert not bar.disable and list(bar) == [0, 1, 2]
    bar.close()
    assert "3/3" in terminal.getvalue()
    assert cli.progress(range(3), file=terminal, disable=True).disable
