"""Text data (examples/text_utils.py) and the transformer LM's losses
(examples/lm.py): loaders, token noise, windows, perplexity, causal
masking."""

import math
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("flax")
ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import lm  # noqa: E402
import text_utils  # noqa: E402

SHAKESPEARE = ROOT / ".." / "shared" / "data" / "tinyshakespeare" / \
    "input.txt"


# -- tokens and loaders -------------------------------------------------------

def test_byte_tokens_round_trip():
    s = "Thou art — “more” lovely\n"
    tokens = text_utils.encode(s)
    assert tokens.dtype == np.uint8
    assert tokens.tolist() == list(s.encode("utf-8"))
    assert text_utils.decode(tokens) == s
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        text_utils.decode(np.array([300]))


def test_wikitext_loader_reads_the_three_files(tmp_path):
    contents = {"wiki.train.raw": " = Valkyria = \n train text ",
                "wiki.valid.raw": " valid ", "wiki.test.raw": "tést"}
    for name, body in contents.items():
        (tmp_path / name).write_text(body, encoding="utf-8")
    splits = text_utils.load_wikitext103(tmp_path)
    assert text_utils.decode(splits.train) == contents["wiki.train.raw"]
    assert text_utils.decode(splits.val) == contents["wiki.valid.raw"]
    assert splits.test.tolist() == list("tést".encode("utf-8"))
    assert splits.vocab_size == 256 and "WikiText-103" in splits.source


def test_wikitext_loader_names_every_missing_file(tmp_path):
    (tmp_path / "wiki.valid.raw").write_text("x")
    with pytest.raises(FileNotFoundError) as err:
        text_utils.load_wikitext103(tmp_path)
    msg = str(err.value)
    assert "wiki.train.raw" in msg and "wiki.test.raw" in msg
    assert "wiki.valid.raw," not in msg.split("missing")[1].split("(")[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        text_utils.load_wikitext103(tmp_path / "nowhere")


def test_plain_text_loader_splits_contiguously_90_5_5(tmp_path):
    body = "".join(chr(ord("a") + i % 26) for i in range(1000))
    path = tmp_path / "corpus.txt"
    path.write_text(body)
    splits = text_utils.load_text_file(path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == \
        (900, 50, 50)
    joined = np.concatenate([splits.train, splits.val, splits.test])
    assert text_utils.decode(joined) == body        # contiguous, in order
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        text_utils.load_text_file(tmp_path / "missing.txt")


def test_tiny_shakespeare_loads():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present (shared data next to the "
                    "repository)")
    splits = text_utils.load_text_file(SHAKESPEARE)
    assert len(splits.train) + len(splits.val) + len(splits.test) == \
        1_115_394                       # ASCII: one byte per character
    assert text_utils.decode(splits.train[:14]) == "First Citizen:"


def test_embedded_corpus_is_deterministic_english_and_says_so():
    a = text_utils.stdlib_docstrings()
    assert a == text_utils.stdlib_docstrings()
    assert "Return" in a and len(a) > 100_000
    splits = text_utils.load_embedded()
    assert "docstrings" in splits.source and "Python" in splits.source
    ood, what = text_utils.out_of_domain(embedded=False, max_tokens=100)
    assert len(ood) == 100 and "docstrings" in what


# -- token noise --------------------------------------------------------------

def test_token_noise_replaces_exactly_the_rounded_share_seeded():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, 10_001).astype(np.uint8)
    noisy, mask = text_utils.corrupt_tokens(tokens, 0.15, seed=3)
    assert int(mask.sum()) == round(0.15 * 10_001) == 1500
    assert np.array_equal(noisy != tokens, mask)       # every one changed
    again, mask2 = text_utils.corrupt_tokens(tokens, 0.15, seed=3)
    assert np.array_equal(again, noisy) and np.array_equal(mask, mask2)
    other, _ = text_utils.corrupt_tokens(tokens, 0.15, seed=4)
    assert not np.array_equal(other, noisy)
    assert np.array_equal(text_utils.corrupt_tokens(tokens, 0.0, 0)[0], tokens)


# -- windows ------------------------------------------------------------------

@pytest.mark.parametrize("n", [33, 40, 64, 100])
def test_eval_windows_predict_every_token_once(n):
    tokens = np.arange(n) % 256
    windows, mask = text_utils.eval_windows(tokens, 8, 3)
    assert windows.shape[1:] == (3, 9) and mask.shape[1:] == (3, 8)
    assert mask.sum() == n - 1
    counted = []
    for w, m in zip(windows.reshape(-1, 9), mask.reshape(-1, 8)):
        counted += w[1:][m].tolist()            # the predicted tokens
    assert sorted(counted) == list(range(1, n))


def test_window_starts_are_seeded_and_in_range():
    a = text_utils.window_starts(100, 10, 4, 5, seed=1)
    assert a.shape == (5, 4) and a.min() >= 0 and a.max() <= 89
    assert np.array_equal(a, text_utils.window_starts(100, 10, 4, 5, seed=1))
    w = text_utils.take_windows(np.arange(100), a, 10)
    assert w.shape == (5, 4, 11) and w.dtype == np.int32


# -- perplexity and the model -------------------------------------------------

def test_perplexity_of_fixed_logits_matches_hand_computation():
    logits = np.log(np.array([[[0.5, 0.25, 0.25], [0.1, 0.6, 0.3]]]))
    targets = np.array([[0, 2]])
    nll = [-math.log(0.5), -math.log(0.3)]
    expected = math.exp(sum(nll) / 2)
    assert float(lm.perplexity(jnp.asarray(logits, jnp.float32),
                               targets)) == pytest.approx(expected, 1e-6)
    mask = np.array([[0, 1]])
    assert float(lm.perplexity(jnp.asarray(logits, jnp.float32), targets,
                               mask)) == pytest.approx(1 / 0.3, 1e-6)


def test_uniform_logits_have_perplexity_vocab_size():
    logits = jnp.full((2, 5, 256), 3.7)
    targets = jnp.arange(10).reshape(2, 5)
    assert float(lm.perplexity(logits, targets)) == pytest.approx(256, 1e-5)


def test_corpus_perplexity_is_exp_of_mean_token_nll_over_all_windows():
    """A model whose logits do not depend on the input: the corpus
    perplexity must be exp(mean NLL over the N - 1 predicted tokens),
    whatever the windowing (not a mean of per-window perplexities)."""
    config = lm.LMConfig(context=8, depth=1, width=8, heads=2)
    params = lm.init_params(config, 0)
    # zero everything but the output LayerNorm bias: logits = E @ bias,
    # the same distribution at every position
    params = jax.tree.map(jnp.zeros_like, params)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(256, 8)).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    params["Embed_0"]["embedding"] = jnp.asarray(emb)
    params["LayerNorm_0"]["bias"] = jnp.asarray(bias)
    logp = emb @ bias
    logp = logp - np.log(np.sum(np.exp(logp - logp.max()))) - logp.max()
    tokens = rng.integers(0, 256, 53)
    expected = math.exp(-np.mean(logp[tokens[1:]]))
    windows, mask = text_utils.eval_windows(tokens, 8, 4)
    got = lm.corpus_perplexity(lm.make_nll_sum(config), params,
                               jnp.asarray(windows), jnp.asarray(mask))
    assert got == pytest.approx(expected, rel=1e-4)


def test_causal_mask_future_tokens_do_not_change_earlier_logits():
    config = lm.LMConfig(context=16, depth=2, width=16, heads=2)
    params = lm.init_params(config, 1)
    logits = jax.jit(lm.make_losses(config)[2])
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 256)
    changed = tokens.at[:, 10].set((tokens[:, 10] + 1) % 256)
    a, b = logits(params, tokens), logits(params, changed)
    np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert float(jnp.max(jnp.abs(a[:, 10:] - b[:, 10:]))) > 1e-4


def test_gpt2_small_shape():
    c = lm.GPT2_SMALL
    assert (c.depth, c.width, c.heads, c.context) == (12, 768, 12, 1024)


def test_training_loss_is_deterministic_and_differentiable_in_noise(x64):
    """Embedding noise comes from the key in the batch (same key, same
    loss) and its level has a gradient that matches finite differences."""
    config = lm.LMConfig(context=8, depth=1, width=8, heads=2)
    params = lm.init_params(config, 0)
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    train_loss, val_loss, _ = lm.make_losses(config)
    batch = {"tokens": jax.random.randint(jax.random.PRNGKey(0), (3, 9), 0,
                                          256),
             "key": jax.random.PRNGKey(5)}

    @jax.jit
    def f(sigma, smoothing=0.1):
        hp = {"embed_noise": sigma, "label_smoothing": smoothing}
        return train_loss(params, hp, batch)
    assert float(f(0.3)) == float(f(0.3))
    assert float(f(0.0, 0.0)) == pytest.approx(
        float(val_loss(params, None, batch)), 1e-12)
    g = float(jax.grad(f)(0.3))
    h = 1e-5
    assert g == pytest.approx((float(f(0.3 + h)) - float(f(0.3 - h)))
                              / (2 * h), rel=1e-6, abs=1e-10)
    assert abs(g) > 0
    gs = float(jax.grad(lambda e: f(0.3, e))(0.1))
    assert gs == pytest.approx((float(f(0.3, 0.1 + h))
                                - float(f(0.3, 0.1 - h))) / (2 * h),
                               rel=1e-6, abs=1e-10)
