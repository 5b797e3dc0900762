"""End-to-end run of examples/ohgw.py --task language --quick (the OHGW
experiment on a transformer LM) and its language-specific options."""

import json
import math
import pathlib
import sys

import numpy as np
import pytest

optuna = pytest.importorskip("optuna")
pytest.importorskip("scipy")
pytest.importorskip("flax")

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import ohgw  # noqa: E402

VARIANTS = ("baseline", "ohgw1", "ohgw3", "random")


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def test_quick_language_run_reports_every_variant(tmp_path):
    ohgw.main(["--task", "language", "--quick", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["args"]["scheduler"] == "pasha"        # language default
    assert result["args"]["direction"] == "minimize"
    assert set(result["variants"]) == set(VARIANTS)
    for name, variant in result["variants"].items():
        assert len(variant["runs"]) == 2                       # paired seeds
        for run in variant["runs"].values():
            for key in ("t_at_target_seconds", "t_at_target_grad_evals",
                        "total_seconds", "total_grad_evals",
                        "best_val_perplexity", "final_val_perplexity",
                        "final_test_perplexity", "final_ood_perplexity",
                        "auc_time", "overhead_grad_share"):
                assert finite(run[key]), (name, key, run[key])
            for key in ("best_val_perplexity", "final_test_perplexity",
                        "final_ood_perplexity"):
                # a trained byte model: better than uniform (256), >= 1
                assert 1.0 <= run[key] < 256.0, (name, key, run[key])
            # the best-so-far curve never increases (minimisation)
            assert np.all(np.diff(run["curve"]["best"]) <= 0)
            if name == "baseline":
                assert run["overhead_grad_share"] == 0.0
            else:
                assert 0.0 < run["overhead_grad_share"] < 1.0
                # every warm start had a finite hypergradient
                assert set(run["statuses"]) <= {"applied", "clipped"}
            assert {"lr", "weight_decay", "label_smoothing",
                    "embed_noise"} <= set(run["final_psi"][0])
        for metric, test in variant["vs_baseline"].items():
            if metric == "kl_final_psi":
                assert (test["value"] is None) == (test["reason"] is not None)
                continue
            p = test["p_value"]
            if p is None:
                assert test["reason"]
            else:
                assert 0.0 <= p <= 1.0
        if name != "baseline":
            assert "final_ood_perplexity" in variant["vs_baseline"]
    for png in ("perplexity_vs_time_per_variant.png",
                "perplexity_vs_time_all.png", "per_seed.png"):
        assert (tmp_path / png).stat().st_size > 0


def test_language_options_and_defaults():
    args = ohgw.parse_args(["--task", "language"])
    assert (args.scheduler, args.metric, args.target) == \
        ("pasha", "perplexity", ohgw.DEFAULT_TARGET_PPL)
    args = ohgw.parse_args(["--task", "language", "--scheduler", "asha",
                            "--target-ppl", "7.5", "--token-noise", "0.15"])
    assert (args.scheduler, args.target, args.token_noise) == \
        ("asha", 7.5, 0.15)
    vision = ohgw.parse_args([])
    assert (vision.scheduler, vision.metric, vision.target, vision.trials,
            vision.lookahead, vision.batch_size) == \
        ("asha", "accuracy", 0.975, 64, 2, 128)
    for bad in (["--token-noise", "0.1"],
                ["--task", "language", "--label-noise", "0.1"],
                ["--task", "language", "--token-noise", "1.5"]):
        with pytest.raises(SystemExit):
            ohgw.parse_args(bad)


def test_label_noise_replaces_the_rounded_share_of_vision_labels():
    args = ohgw.parse_args(["--label-noise", "0.15", "--seed", "3"])
    labels = np.arange(1000) % 10
    noisy, note = ohgw.noisy_labels(labels, args)
    assert int(np.sum(noisy != labels)) == 150 and "150 of 1000" in note
    again, _ = ohgw.noisy_labels(labels, args)
    assert np.array_equal(noisy, again) and noisy.max() <= 9
    assert ohgw.noisy_labels(labels, ohgw.parse_args([]))[1] == ""


def test_wikitext_data_dir_missing_files_are_named(tmp_path):
    args = ohgw.parse_args(["--task", "language", "--data-dir",
                            str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="wiki.train.raw"):
        ohgw.load_text(args)


def test_warm_start_hypergradient_is_finite_for_every_hyperparameter():
    """Through the LM's AdamW step, all four hypergradients are finite and
    the loss hyperparameters get a nonzero signal (eps_root, lm.EPS_ROOT;
    without it label smoothing and embedding noise came out NaN)."""
    import jax
    import jax.numpy as jnp

    import gradhpo as gh
    import lm
    import text_utils

    config = lm.LMConfig(context=16, depth=1, width=16, heads=2)
    train_loss, val_loss, _ = lm.make_losses(config)
    tokens = text_utils.encode(
        text_utils.stdlib_docstrings(("heapq", "bisect")))
    starts = text_utils.window_starts(len(tokens), 16, 16, 2, seed=0)
    windows = jnp.asarray(text_utils.take_windows(tokens, starts, 16))
    train = {"tokens": windows[0], "key": jax.random.PRNGKey(1)}
    ws = gh.OneShotWarmStart(train_loss, val_loss, lm.inner_optimizer())
    hp = {"lr": jnp.log(jnp.float32(3e-3)),
          "weight_decay": jnp.log(jnp.float32(0.1)),
          "label_smoothing": jnp.float32(0.1),
          "embed_noise": jnp.float32(0.1)}
    g = ws.compute_hypergradient(ws.init(lm.init_params(config, 0), hp),
                                 train, {"tokens": windows[1]})
    for name, value in g.items():
        assert bool(jnp.isfinite(value)), (name, value)
    for name in ("lr", "label_smoothing", "embed_noise"):
        assert float(g[name]) != 0.0, name
