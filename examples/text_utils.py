r"""Text data for the language-modelling examples: corpora, tokens, windows.

A support module of the examples, not part of the installed ``gradhpo``
package (which does no data loading). The examples put their own folder on
``sys.path`` when run as scripts, so they ``import text_utils``; tests do the
same. Everything returns plain numpy arrays (tokens ``uint8``, windows
``int32``).

**Tokenisation: bytes.** A text is encoded as its UTF-8 bytes, one token per
byte, so the vocabulary is fixed at :data:`VOCAB_SIZE` = 256 whatever the
corpus (:func:`encode`, :func:`decode`). Byte tokens need no vocabulary
file, never meet an unknown symbol, and give one vocabulary to an in-domain
and an out-of-domain text, so an OOD perplexity is defined; for ASCII text
(Tiny Shakespeare, WikiText's English) a byte is a character, so the
perplexities are character-level ones.

Corpora (each a :class:`TextSplits` of token arrays):

- :func:`load_wikitext103`: the WikiText-103 raw files ``wiki.train.raw``,
  ``wiki.valid.raw``, ``wiki.test.raw`` of a directory, used as they are
  split; a missing file raises :class:`FileNotFoundError` naming every
  missing one.
- :func:`load_text_file`: any plain-text file (e.g. Tiny Shakespeare,
  ``../shared/data/tinyshakespeare/input.txt`` next to the repository),
  split *contiguously* into
  the first 90 % for training, the next 5 % for validation and the last 5 %
  for test (:func:`split_contiguous`): shuffling windows of one running text
  would put the neighbours of every test window into the training set.
- :func:`load_embedded`: the default that needs no file and no download —
  the English docstrings of a fixed list of Python standard-library modules
  (:data:`DOC_MODULES`), collected with :mod:`inspect`
  (:func:`stdlib_docstrings`), deterministic for a given Python version
  (the source line says which), split like a plain text.

:func:`out_of_domain` picks the held-out text of another domain for an OOD
perplexity: the embedded docstrings when training on any file, and Tiny
Shakespeare (when found) or else Python source code when training on the
docstrings.

Batches: a language-model batch is a ``(B, T + 1)`` integer array of
windows of :math:`T + 1` consecutive tokens (inputs ``[:, :-1]``, targets
``[:, 1:]``); :func:`window_starts` and :func:`take_windows` draw them
seeded, with a fixed shape, so a jitted step compiles once.
:func:`eval_windows` tiles a whole split so that *every* token after the
first is predicted exactly once (a mask marks the targets counted), which is
what a perplexity needs.

:func:`corrupt_tokens` is the robustness control of the OHGW paper
(*One-Shot Hyper-Gradient Warm-Starts for Bandit-Style Hyperparameter
Optimisation*: "15 % token noise"): it replaces exactly ``round(fraction *
N)`` tokens, chosen without replacement, each by a uniformly drawn
*different* token.
"""

if __name__ == "__main__":      # answer before importing JAX
    import cli
    cli.support_module_main(
        __doc__,
        "text_utils.py is a support module: the text corpora of "
        "python examples/ohgw.py --task language; it has nothing to "
        "run. See python examples/ohgw.py --help.")

import importlib
import inspect
import logging
import os
import pathlib
import sys
import warnings
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from gradhpo.utils import validation as val

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

#: Byte-level tokens: one token per UTF-8 byte.
VOCAB_SIZE = 256
#: The WikiText-103 raw files, in (train, valid, test) order.
WIKITEXT_FILES = ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw")
#: Standard-library modules whose docstrings form the embedded corpus
#: (pure-Python modules with English docstrings that import everywhere:
#: no GUI, no platform-only modules).
DOC_MODULES = (
    "abc", "argparse", "base64", "bisect", "calendar", "collections",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email.message", "enum", "fractions", "ftplib", "functools",
    "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser",
    "http.client", "imaplib", "inspect", "io", "ipaddress", "json",
    "locale", "logging", "mailbox", "numbers", "operator", "optparse",
    "pathlib", "pickle", "pkgutil", "platform", "pprint", "queue",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex",
    "shutil", "smtplib", "socket", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit",
    "tokenize", "traceback", "typing", "unittest.case", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "xml.dom.minidom",
    "zipfile")
#: Modules whose *source code* is the out-of-domain text for the embedded
#: corpus when Tiny Shakespeare is not found.
SOURCE_MODULES = ("bisect", "heapq", "textwrap", "fractions", "statistics",
                  "difflib", "shlex", "calendar", "csv", "string")
#: The repository's root: the parent of the ``examples`` folder holding this
#: file (the examples run from a checkout, never from an installed package).
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
#: Tiny Shakespeare relative to the repository's root: the shared data folder
#: that sits next to the checkout.
SHAKESPEARE = pathlib.Path("..", "shared", "data", "tinyshakespeare",
                           "input.txt")


class TextSplits(NamedTuple):
    """Train / validation / test token arrays (``uint8`` byte tokens).

    Attributes:
      train, val, test: 1-D arrays of token ids in ``[0, VOCAB_SIZE)``.
      source: a one-line description of where the text came from and how it
        was split.
      vocab_size: :data:`VOCAB_SIZE`.
    """
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    source: str
    vocab_size: int = VOCAB_SIZE


# -- tokens -------------------------------------------------------------------

def encode(text: str) -> np.ndarray:
    """Byte-level tokens of ``text``: its UTF-8 bytes (``uint8``; one byte
    per token keeps WikiText-103's 540 M tokens at 540 MB).

    Example:
      >>> encode("hé").tolist()      # 'é' is two UTF-8 bytes
      [104, 195, 169]
    """
    return np.frombuffer(text.encode("utf-8"), np.uint8).copy()


def decode(tokens: np.ndarray) -> str:
    """The text of byte tokens (invalid UTF-8 sequences become U+FFFD).

    Example:
      >>> decode(encode("To be, or not to be"))
      'To be, or not to be'
    """
    data = np.asarray(tokens, np.int64)
    if data.size and (data.min() < 0 or data.max() >= VOCAB_SIZE):
        raise ValueError(f"tokens must be in [0, {VOCAB_SIZE}); got values in "
                         f"[{data.min()}, {data.max()}].")
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _read_text(path: pathlib.Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


# -- corpora ------------------------------------------------------------------

def split_contiguous(tokens: np.ndarray, val_fraction: float = 0.05,
                     test_fraction: float = 0.05
                     ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contiguous train / validation / test split of one running text.

    The sizes are ``n_val = round(val_fraction * N)``, ``n_test =
    round(test_fraction * N)`` and the rest for training, taken in that order
    from the front: ``train = tokens[:n_train]``, ``val`` next, ``test`` last.

    Example:
      >>> tr, va, te = split_contiguous(np.arange(20), 0.1, 0.1)
      >>> tr.tolist()[-1], va.tolist(), te.tolist()
      (15, [16, 17], [18, 19])
    """
    tokens = np.asarray(tokens)
    val_fraction = val.check_real(val_fraction, "val_fraction", 0.0, 1.0,
                                  high_open=True)
    test_fraction = val.check_real(test_fraction, "test_fraction", 0.0, 1.0,
                                   high_open=True)
    n = len(tokens)
    n_val = int(round(val_fraction * n))
    n_test = int(round(test_fraction * n))
    n_train = n - n_val - n_test
    if n_train < 2:
        raise ValueError(
            "val_fraction + test_fraction must leave at least two training "
            f"tokens; got {val_fraction} + {test_fraction} of {n} tokens.")
    return (tokens[:n_train], tokens[n_train:n_train + n_val],
            tokens[n_train + n_val:])


def load_text_file(path: PathLike, val_fraction: float = 0.05,
                   test_fraction: float = 0.05) -> TextSplits:
    """A plain-text corpus, byte-tokenised and split contiguously 90/5/5.

    Args:
      path: a UTF-8 text file (invalid bytes are replaced).
      val_fraction, test_fraction: see :func:`split_contiguous`.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the file is too short to split.
    """
    path = pathlib.Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file.")
    tokens = encode(_read_text(path))
    parts = split_contiguous(tokens, val_fraction, test_fraction)
    share = 1 - val_fraction - test_fraction
    return TextSplits(*parts, source=(
        f"{path} ({len(tokens):,} byte tokens, contiguous split "
        f"{share:.0%}/{val_fraction:.0%}/{test_fraction:.0%}: "
        f"{len(parts[0]):,}/{len(parts[1]):,}/{len(parts[2]):,})"))


def load_wikitext103(data_dir: PathLike) -> TextSplits:
    """The WikiText-103 raw files of a directory, as their own splits.

    Reads ``wiki.train.raw``, ``wiki.valid.raw`` and ``wiki.test.raw``
    (:data:`WIKITEXT_FILES`; the ``wikitext-103-raw`` release, UTF-8) and
    byte-tokenises each.

    Raises:
      FileNotFoundError: the directory or any of the three files is missing
        (the message names every missing file).
    """
    path = pathlib.Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path}: data directory does not exist (expected the "
            f"WikiText-103 raw files {', '.join(WIKITEXT_FILES)}).")
    missing = [name for name in WIKITEXT_FILES
               if not (path / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{path}: missing WikiText-103 raw file(s) {', '.join(missing)} "
            "(the wikitext-103-raw release holds wiki.train.raw, "
            "wiki.valid.raw and wiki.test.raw).")
    parts = [encode(_read_text(path / name)) for name in WIKITEXT_FILES]
    return TextSplits(*parts, source=(
        f"WikiText-103 raw from {path} (byte tokens "
        f"{len(parts[0]):,}/{len(parts[1]):,}/{len(parts[2]):,})"))


def _public_docs(module) -> list:
    """Docstrings of a module, its public classes and functions defined in
    it, and those classes' public methods, in sorted-name order."""
    docs = [inspect.getdoc(module)]
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) \
                != module.__name__:
            continue
        if inspect.isclass(obj) or inspect.isfunction(obj):
            docs.append(inspect.getdoc(obj))
        if inspect.isclass(obj):
            docs.extend(inspect.getdoc(member) for member_name, member
                        in sorted(vars(obj).items())
                        if not member_name.startswith("_")
                        and inspect.isfunction(member))
    return docs


def stdlib_docstrings(modules: Sequence[str] = DOC_MODULES) -> str:
    """The embedded corpus: English docstrings of standard-library modules.

    For each module in ``modules`` (in the given order): the module's
    docstring, then those of its public classes and functions (defined in
    that module, in sorted-name order) and of the classes' public methods,
    each cleaned by :func:`inspect.getdoc`; empty and repeated docstrings are
    dropped; blocks are joined by blank lines. The text depends only on the
    Python version (docstrings change between releases).

    Raises:
      RuntimeError: Python runs with ``-OO`` (docstrings stripped).
    """
    if sys.flags.optimize >= 2:
        raise RuntimeError("the embedded corpus needs docstrings, but Python "
                           "runs with -OO; run without it or pass a text "
                           "file.")
    seen, parts = set(), []
    with warnings.catch_warnings():
        # reading typing.io / typing.re warns; the text is unaffected
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in modules:
            for doc in _public_docs(importlib.import_module(name)):
                if doc and doc not in seen:
                    seen.add(doc)
                    parts.append(doc)
    return "\n\n".join(parts)


def _python_version() -> str:
    return ".".join(map(str, sys.version_info[:3]))


def load_embedded(val_fraction: float = 0.05,
                  test_fraction: float = 0.05) -> TextSplits:
    """The default corpus: :func:`stdlib_docstrings` split contiguously.

    Example:
      >>> splits = load_embedded()
      >>> splits.vocab_size, len(splits.train) > 300_000
      (256, True)
    """
    tokens = encode(stdlib_docstrings())
    parts = split_contiguous(tokens, val_fraction, test_fraction)
    return TextSplits(*parts, source=(
        f"embedded corpus: English docstrings of {len(DOC_MODULES)} Python "
        f"{_python_version()} standard-library modules (inspect.getdoc; "
        f"{len(tokens):,} byte tokens, contiguous split "
        f"{len(parts[0]):,}/{len(parts[1]):,}/{len(parts[2]):,})"))


def python_source(modules: Sequence[str] = SOURCE_MODULES) -> str:
    """The source code of standard-library modules, joined (an
    out-of-domain text for the docstring corpus)."""
    return "\n\n".join(inspect.getsource(importlib.import_module(m))
                       for m in modules)


def find_shakespeare(root: Optional[PathLike] = None
                     ) -> Optional[pathlib.Path]:
    """``../shared/data/tinyshakespeare/input.txt`` relative to ``root``
    (default :data:`REPO_ROOT`, the repository holding ``examples/``), or
    None if absent."""
    root = REPO_ROOT if root is None else pathlib.Path(root)
    path = (root / SHAKESPEARE).resolve()
    return path if path.is_file() else None


def out_of_domain(embedded: bool, max_tokens: Optional[int] = None
                  ) -> Tuple[np.ndarray, str]:
    """A held-out text of another domain, for an OOD perplexity.

    Args:
      embedded: whether the model trains on the embedded docstrings. Then
        the OOD text is Tiny Shakespeare (when :func:`find_shakespeare`
        finds it) or else :func:`python_source`; otherwise (a file or
        WikiText) it is the embedded docstrings, whole.
      max_tokens: keep only the first ``max_tokens`` tokens (None: all).

    Returns:
      ``(tokens, description)``.
    """
    if embedded:
        path = find_shakespeare()
        if path is not None:
            tokens, what = encode(_read_text(path)), f"Tiny Shakespeare {path}"
        else:
            tokens = encode(python_source())
            what = (f"Python {_python_version()} source of "
                    f"{len(SOURCE_MODULES)} standard-library modules")
    else:
        tokens = encode(stdlib_docstrings())
        what = (f"the embedded docstrings of {len(DOC_MODULES)} Python "
                f"{_python_version()} standard-library modules")
    if max_tokens is not None:
        max_tokens = val.check_int(max_tokens, "max_tokens", minimum=2)
        tokens = tokens[:max_tokens]
    return tokens, f"{what} (first {len(tokens):,} byte tokens)"


# -- noise --------------------------------------------------------------------

def corrupt_tokens(tokens: np.ndarray, fraction: float, seed: int,
                   vocab_size: int = VOCAB_SIZE
                   ) -> Tuple[np.ndarray, np.ndarray]:
    """Replaces exactly ``round(fraction * N)`` tokens by different ones.

    The positions are drawn without replacement and each chosen token is
    replaced by one drawn uniformly from the ``vocab_size - 1`` *other*
    tokens, so exactly that many tokens change (the paper's "15 % token
    noise" with ``fraction=0.15``). Seeded: the same seed gives the same
    corruption.

    Args:
      tokens: 1-D token ids in ``[0, vocab_size)``.
      fraction: the share of tokens to replace, in [0, 1].
      seed: seed of the numpy Generator.
      vocab_size: the number of token values (>= 2).

    Returns:
      ``(noisy tokens, boolean mask of the replaced positions)``.

    Example:
      >>> noisy, mask = corrupt_tokens(np.zeros(20, np.int32), 0.15, seed=0)
      >>> int(mask.sum()), int((noisy != 0).sum())
      (3, 3)
    """
    tokens = np.asarray(tokens)
    fraction = val.check_real(fraction, "fraction", 0.0, 1.0)
    seed = val.check_seed(seed)
    vocab_size = val.check_int(vocab_size, "vocab_size", minimum=2)
    n = len(tokens)
    rng = np.random.default_rng(seed)
    where = rng.choice(n, size=int(round(fraction * n)), replace=False)
    # an offset in [1, V) keeps the new token different from the old one
    offsets = rng.integers(1, vocab_size, size=len(where))
    noisy = tokens.copy()
    noisy[where] = (tokens[where] + offsets) % vocab_size
    mask = np.zeros(n, bool)
    mask[where] = True
    return noisy, mask


# -- windows ------------------------------------------------------------------

def window_starts(num_tokens: int, context: int, batch_size: int,
                  steps: int, seed: int) -> np.ndarray:
    """Seeded random window starts, shape ``(steps, batch_size)``.

    Each start :math:`s` is uniform on ``[0, num_tokens - context - 1]``,
    so ``tokens[s:s + context + 1]`` is a whole window.
    """
    context = val.check_int(context, "context")
    batch_size = val.check_int(batch_size, "batch_size")
    steps = val.check_int(steps, "steps", minimum=0)
    high = num_tokens - context
    if high < 1:
        raise ValueError(f"a window of context + 1 = {context + 1} tokens "
                         f"needs more than {num_tokens} tokens; use a "
                         "shorter context.")
    rng = np.random.default_rng(val.check_seed(seed))
    return rng.integers(0, high, size=(steps, batch_size))


def take_windows(tokens: np.ndarray, starts: np.ndarray,
                 context: int) -> np.ndarray:
    """``tokens[s:s + context + 1]`` for every start, stacked:
    shape ``starts.shape + (context + 1,)``, ``int32``.

    Example:
      >>> take_windows(np.arange(10), np.array([0, 5]), 3).tolist()
      [[0, 1, 2, 3], [5, 6, 7, 8]]
    """
    starts = np.asarray(starts)
    # index first, convert after: a corpus stays one byte per token
    return np.asarray(tokens)[starts[..., None]
                              + np.arange(context + 1)].astype(np.int32)


def eval_windows(tokens: np.ndarray, context: int, batch_size: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Windows and target mask that predict every token exactly once.

    Windows of ``context + 1`` tokens start at ``0, T, 2T, ...``
    (:math:`T` = ``context``), so each predicts the next :math:`T` tokens
    from the ones before it in the window; a last window aligned to the
    end covers the tail, with only its targets not yet predicted counted.
    The windows are grouped into batches of ``batch_size`` and the last
    batch is padded with masked windows, so every batch has one shape.

    Args:
      tokens: 1-D tokens, at least ``context + 1`` of them.
      context: :math:`T`.
      batch_size: windows per batch.

    Returns:
      ``(windows, mask)`` of shapes ``(M, batch_size, T + 1)`` and
      ``(M, batch_size, T)``; ``mask.sum() == len(tokens) - 1`` and every
      target position ``1..N-1`` is counted once.

    Example:
      >>> w, m = eval_windows(np.arange(7), 3, 2)
      >>> w.tolist(), m.astype(int).tolist()
      ([[[0, 1, 2, 3], [3, 4, 5, 6]]], [[[1, 1, 1], [1, 1, 1]]])
      >>> w, m = eval_windows(np.arange(8), 3, 2)
      >>> w[1, 0].tolist(), m.astype(int).tolist()
      ([4, 5, 6, 7], [[[1, 1, 1], [1, 1, 1]], [[0, 0, 1], [0, 0, 0]]])
    """
    tokens = np.asarray(tokens)
    context = val.check_int(context, "context")
    batch_size = val.check_int(batch_size, "batch_size")
    n = len(tokens)
    if n < context + 1:
        raise ValueError(f"need at least context + 1 = {context + 1} tokens "
                         f"to evaluate, got {n}.")
    starts = list(range(0, n - context, context))
    masks = [np.ones(context, bool) for _ in starts]
    covered = starts[-1] + context          # last target position counted
    if covered < n - 1:
        starts.append(n - context - 1)
        tail = np.zeros(context, bool)
        tail[context - (n - 1 - covered):] = True
        masks.append(tail)
    pad = -len(starts) % batch_size
    windows = take_windows(tokens, np.array(starts + [0] * pad), context)
    mask = np.stack(masks + [np.zeros(context, bool)] * pad)
    m = len(windows) // batch_size
    return (windows.reshape(m, batch_size, context + 1),
            mask.reshape(m, batch_size, context))
