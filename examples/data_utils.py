r"""Data loaders for the examples: MNIST (IDX), CIFAR-10, scikit-learn digits.

A support module of the examples, not part of the installed ``gradhpo``
package (which does no data loading). The examples put their own folder on
``sys.path`` when run as scripts, so they ``import data_utils``; tests do
the same. Everything returns plain numpy arrays (images as ``uint8``, labels
as ``int64``); converting to JAX arrays and standardising is the caller's
choice (:func:`standardize`, :func:`one_hot`).

Formats read:

- MNIST IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped
  (``.gz``) or raw, with their magic numbers (2051 images, 2049 labels),
  header dimensions and sizes checked (:func:`read_idx`, :func:`load_mnist`).
- The CIFAR-10 python batches ``data_batch_1`` … ``data_batch_5`` and
  ``test_batch`` (:func:`load_cifar10`), through a restricted unpickler.
- scikit-learn's bundled ``load_digits`` (1,797 8×8 images, no download), the
  default that needs nothing (:func:`load_digits_splits`).

The ``*_splits`` loaders return a :class:`Splits` of train / validation /
test. When a directory holds only the 10,000 MNIST test images (as
``../shared/data/mnist``, next to the repository, does on machines that
cannot download), those are split three ways and :attr:`Splits.note` says
so. No loader has a default location: the directory is always passed
explicitly (the examples' ``--data-dir``).

Nothing downloads unless asked: :func:`download_mnist` and
:func:`download_cifar10` fetch with ``urllib`` and refuse any file whose md5
differs from the published one (the partial file is deleted and
:class:`ValueError` raised).

:func:`batches` is a seeded minibatch iterator with a fixed batch size, so a
jitted step sees one shape and compiles once.
"""

if __name__ == "__main__":      # answer before importing JAX
    import cli
    cli.support_module_main(
        __doc__,
        "data_utils.py is a support module: the examples' data "
        "loaders; it has nothing to run. Run an example, e.g. python "
        "examples/mnist.py --help.")

import codecs
import gzip
import hashlib
import logging
import os
import pathlib
import pickle
import tarfile
import urllib.request
import zlib
from typing import (Dict, Iterator, Mapping, NamedTuple, Optional, Sequence,
                    Tuple, Union)

import numpy as np

from gradhpo.utils import validation as val

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
Pair = Tuple[np.ndarray, np.ndarray]

# -- IDX ----------------------------------------------------------------------

#: IDX type code (third magic byte) -> big-endian numpy dtype.
IDX_DTYPES = {
    0x08: np.dtype(">u1"),   # unsigned byte
    0x09: np.dtype(">i1"),   # signed byte
    0x0B: np.dtype(">i2"),   # short
    0x0C: np.dtype(">i4"),   # int
    0x0D: np.dtype(">f4"),   # float
    0x0E: np.dtype(">f8"),   # double
}
MNIST_IMAGES_MAGIC = 2051    # 0x00000803: unsigned byte, 3 dimensions
MNIST_LABELS_MAGIC = 2049    # 0x00000801: unsigned byte, 1 dimension
_MNIST_PREFIX = {"train": "train", "test": "t10k"}


def _read_bytes(path: pathlib.Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file.")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(f"{path}: corrupt gzip data ({err}); expected "
                             "a gzipped IDX file.") from err
    return raw


def _idx_header(raw: bytes, path: pathlib.Path) -> Tuple[int, Tuple[int, ...]]:
    """(magic, dims) of an IDX file, checking the header is well formed."""
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX "
                         "header (expected at least 4 magic bytes).")
    magic = int.from_bytes(raw[:4], "big")
    code, ndim = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or code not in IDX_DTYPES or ndim < 1:
        codes = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise ValueError(
            f"{path}: bad IDX magic number {magic} (0x{magic:08X}); expected "
            f"two zero bytes, a type code in {{{codes}}} and a dimension "
            "count >= 1.")
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header (expected "
                         f"{4 + 4 * ndim} bytes for {ndim} dimensions, the "
                         f"file has {len(raw)}).")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
                 for i in range(ndim))
    return magic, dims


def _idx_array(raw: bytes, path: pathlib.Path) -> np.ndarray:
    magic, dims = _idx_header(raw, path)
    dtype = IDX_DTYPES[raw[2]]
    offset = 4 + 4 * len(dims)
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - offset
    if found != expected:
        what = "truncated" if found < expected else "has trailing bytes"
        raise ValueError(
            f"{path}: {what}: the header declares dimensions {dims} of "
            f"{dtype.name} ({expected} data bytes) but the file holds "
            f"{found} data bytes.")
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize,
                          offset=offset).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def read_idx(path: PathLike) -> np.ndarray:
    """Reads one IDX file (gzipped or raw) into a native-endian numpy array.

    The IDX format: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B
    int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions
    ``d``, then ``d`` big-endian int32 sizes and the big-endian data in C
    order. Gzip is recognised by its magic bytes, whatever the file's suffix.

    Args:
      path: the file.

    Returns:
      An array of the header's shape and type, in native byte order.

    Raises:
      FileNotFoundError: the file does not exist.
      ValueError: the magic number, header or data size is wrong (the message
        names the file and what was expected).

    Example:
      >>> import pathlib, tempfile
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (d / "x.idx").write_bytes(
      ...     bytes([0, 0, 0x0B, 1, 0, 0, 0, 2, 0, 1, 255, 255]))
      >>> read_idx(d / "x.idx")
      array([ 1, -1], dtype=int16)
    """
    path = pathlib.Path(path)
    return _idx_array(_read_bytes(path), path)


def _mnist_path(data_dir: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
    for name in (stem + ".gz", stem):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def _has_mnist_split(data_dir: pathlib.Path, split: str) -> bool:
    prefix = _MNIST_PREFIX[split]
    return all(_mnist_path(data_dir, f"{prefix}-{kind}-ubyte") is not None
               for kind in ("images-idx3", "labels-idx1"))


def _read_mnist_file(data_dir: pathlib.Path, stem: str, magic: int,
                     kind: str) -> Tuple[np.ndarray, pathlib.Path]:
    path = _mnist_path(data_dir, stem)
    if path is None:
        raise FileNotFoundError(
            f"{data_dir / (stem + '.gz')}: no such file (nor the raw "
            f"{data_dir / stem}); expected the MNIST {kind} file, gzipped "
            "or raw (download_mnist(data_dir) fetches it).")
    raw = _read_bytes(path)
    found, _ = _idx_header(raw, path)
    if found != magic:
        raise ValueError(
            f"{path}: magic number {found} (0x{found:08X}) is not that of an "
            f"MNIST {kind} file; expected {magic} (0x{magic:08X}).")
    return _idx_array(raw, path), path


def load_mnist(data_dir: PathLike, split: str = "train") -> Pair:
    """Reads the MNIST images and labels of one split from IDX files.

    Looks in ``data_dir`` for ``{train,t10k}-images-idx3-ubyte`` and
    ``{train,t10k}-labels-idx1-ubyte``, each gzipped (``.gz``, preferred) or
    raw. Checks the magic numbers (2051 images, 2049 labels), the header
    dimensions against the data size and that both files hold the same
    number of examples.

    Args:
      data_dir: the directory holding the files.
      split: ``"train"`` (60,000 images) or ``"test"`` (``t10k``, 10,000).

    Returns:
      ``(images, labels)``: ``uint8`` of shape ``(N, 28, 28)`` (pixel values
      0–255; rows and columns as the header gives them) and ``int64`` of
      shape ``(N,)`` (digits 0–9).

    Raises:
      FileNotFoundError: a file is missing (the message names it).
      ValueError: a file is corrupt or the counts disagree (the message names
        the file and what was expected).

    Example:
      >>> import pathlib, tempfile
      >>> d = pathlib.Path(tempfile.mkdtemp())
      >>> head = bytes([0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28])
      >>> _ = (d / "t10k-images-idx3-ubyte").write_bytes(
      ...     head + bytes(28 * 28))
      >>> _ = (d / "t10k-labels-idx1-ubyte").write_bytes(
      ...     bytes([0, 0, 8, 1, 0, 0, 0, 1, 7]))
      >>> images, labels = load_mnist(d, split="test")
      >>> images.shape, images.dtype, labels
      ((1, 28, 28), dtype('uint8'), array([7]))
    """
    val.check_choice(split, "split", _MNIST_PREFIX)
    data_dir = _existing_dir(data_dir)
    prefix = _MNIST_PREFIX[split]
    images, ipath = _read_mnist_file(
        data_dir, f"{prefix}-images-idx3-ubyte", MNIST_IMAGES_MAGIC, "images")
    labels, lpath = _read_mnist_file(
        data_dir, f"{prefix}-labels-idx1-ubyte", MNIST_LABELS_MAGIC, "labels")
    if len(images) != len(labels):
        raise ValueError(
            f"{ipath} holds {len(images)} images but {lpath} holds "
            f"{len(labels)} labels; expected the same count (mismatched or "
            "corrupt MNIST files).")
    return images, labels.astype(np.int64)


def _existing_dir(data_dir: PathLike) -> pathlib.Path:
    path = pathlib.Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: data directory does not exist.")
    return path


# -- splits -------------------------------------------------------------------

class Splits(NamedTuple):
    """Train / validation / test ``(x, y)`` pairs of numpy arrays.

    Attributes:
      train, val, test: ``(inputs, labels)`` pairs.
      source: a one-line description of where the data came from.
      note: ``""`` unless the split departs from the dataset's standard one
        (e.g. only the MNIST test files were found and were split three
        ways); then a sentence an example should print.
      test_only: whether train and validation were carved out of the
        official test set.
    """
    train: Pair
    val: Pair
    test: Pair
    source: str
    note: str = ""
    test_only: bool = False


def split_indices(labels: np.ndarray, val_fraction: float,
                  test_fraction: float, seed: int,
                  stratify: bool = True) -> Tuple[np.ndarray, ...]:
    """Seeded train / validation / test index split, optionally stratified.

    The sizes are ``n_test = round(test_fraction * N)``, ``n_val =
    round(val_fraction * N)`` and the rest for training. With ``stratify``,
    examples are shuffled within each class and interleaved by their rank
    fraction within the class, so every prefix of the order (hence each
    split, and any prefix of each split) holds the classes in proportion to
    within about one example per class.

    Args:
      labels: integer labels, shape ``(N,)``.
      val_fraction: share of the ``N`` examples for validation, in [0, 1).
      test_fraction: share for test, in [0, 1).
      seed: seed of the numpy Generator that shuffles.
      stratify: keep class proportions (else a plain random split).

    Returns:
      ``(train, val, test)`` disjoint index arrays covering ``range(N)``, each
      in a (stratified) random order.

    Example:
      >>> tr, va, te = split_indices(np.arange(10) % 2, 0.2, 0.2, seed=0)
      >>> len(tr), len(va), len(te), sorted((np.arange(10)[va] % 2).tolist())
      (6, 2, 2, [0, 1])
    """
    labels = np.asarray(labels)
    val_fraction = val.check_real(val_fraction, "val_fraction", 0.0, 1.0,
                                  high_open=True)
    test_fraction = val.check_real(test_fraction, "test_fraction", 0.0, 1.0,
                                   high_open=True)
    seed = val.check_int(seed, "seed", minimum=0)
    n = len(labels)
    n_test = int(round(test_fraction * n))
    n_val = int(round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise ValueError(
            f"val_fraction + test_fraction must leave at least one training "
            f"example; got {val_fraction} + {test_fraction} of {n} examples.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if stratify:
        # Rank of each example within its class (in the shuffled order) plus
        # a uniform jitter, divided by the class size: sorting by it deals
        # out each class evenly along the whole order.
        ranked = labels[order]
        key = np.empty(n)
        for c in np.unique(ranked):
            members = np.flatnonzero(ranked == c)
            key[members] = ((np.arange(len(members))
                             + rng.random(len(members))) / len(members))
        order = order[np.argsort(key, kind="stable")]
    test = order[:n_test]
    val_idx = order[n_test:n_test + n_val]
    train = order[n_test + n_val:]
    return train, val_idx, test


def _take(x: np.ndarray, y: np.ndarray, idx: np.ndarray) -> Pair:
    return x[idx], y[idx]


def load_mnist_splits(data_dir: PathLike, val_fraction: float = 0.1,
                      test_fraction: float = 0.2, seed: int = 0,
                      stratify: bool = True) -> Splits:
    """MNIST train / validation / test splits from a directory of IDX files.

    With the full MNIST (train and ``t10k`` files), the 60,000 training
    images are split into train and validation (``val_fraction`` of them)
    and ``t10k`` is the test set (``test_fraction`` is unused). With only
    the ``t10k`` files, the 10,000 test images are split into train,
    validation (``val_fraction``) and test (``test_fraction``); the
    returned :attr:`Splits.note` says so, and the same sentence is logged
    at WARNING level on this module's logger (test accuracy is then measured
    on a subset of the official test set, and is not comparable with
    published numbers).

    Args:
      data_dir: directory with the IDX files (see :func:`load_mnist`).
      val_fraction: validation share of the examples being split.
      test_fraction: test share, used only when only the test files exist.
      seed: seed of the split.
      stratify: keep the digit proportions in each split.

    Returns:
      A :class:`Splits` of ``uint8`` ``(n, 28, 28)`` images and ``int64``
      labels.

    Example:
      >>> repo = pathlib.Path(__file__).resolve().parents[1]  # examples/..
      >>> d = repo / ".." / "shared" / "data" / "mnist"  # 10,000 test images
      >>> s = load_mnist_splits(d, seed=0) if d.is_dir() else None
      >>> sizes = [len(p[1]) for p in (s.train, s.val, s.test)] if s else None
      >>> sizes in (None, [7000, 1000, 2000])
      True
    """
    data_dir = _existing_dir(data_dir)
    has_train = _has_mnist_split(data_dir, "train")
    if has_train or not _has_mnist_split(data_dir, "test"):
        # Either the full set, or files missing: load_mnist names them.
        x, y = load_mnist(data_dir, "train")
        tr, va, _ = split_indices(y, val_fraction, 0.0, seed, stratify)
        test = load_mnist(data_dir, "test")
        return Splits(_take(x, y, tr), _take(x, y, va), test,
                      source=f"MNIST from {data_dir}: {len(tr)} train / "
                             f"{len(va)} validation (from the 60,000 "
                             f"training images) / {len(test[1])} test")
    x, y = load_mnist(data_dir, "test")
    if val.check_real(test_fraction, "test_fraction", 0.0, 1.0) <= 0:
        raise ValueError(
            f"test_fraction must be in (0, 1) when {data_dir} holds only the "
            f"MNIST test files (they are split three ways); got "
            f"{test_fraction}.")
    tr, va, te = split_indices(y, val_fraction, test_fraction, seed, stratify)
    note = (f"Only the MNIST test files were found in {data_dir}: its "
            f"{len(y)} images were split into {len(tr)} train / {len(va)} "
            f"validation / {len(te)} test (seed {seed}"
            f"{', stratified' if stratify else ''}); test accuracy is on a "
            "subset of the official test set.")
    logger.warning(note)
    return Splits(_take(x, y, tr), _take(x, y, va), _take(x, y, te),
                  source=f"MNIST test set from {data_dir}", note=note,
                  test_only=True)


def load_digits_splits(seed: int = 0, val_fraction: float = 0.2,
                       test_fraction: float = 0.2,
                       stratify: bool = True) -> Splits:
    """scikit-learn's bundled digits, split into train / validation / test.

    The 1,797 8×8 images ship with scikit-learn (no download), so this is
    the default when no data directory is given.

    Args:
      seed: seed of the split.
      val_fraction, test_fraction: shares of the 1,797 examples.
      stratify: keep the digit proportions in each split.

    Returns:
      A :class:`Splits` of ``float32`` ``(n, 8, 8)`` images (grey levels
      0–16) and ``int64`` labels 0–9.

    Example:
      >>> s = load_digits_splits(seed=0)
      >>> [len(part[0]) for part in (s.train, s.val, s.test)]
      [1079, 359, 359]
      >>> s.train[0].shape[1:], s.train[0].dtype
      ((8, 8), dtype('float32'))
    """
    from sklearn.datasets import load_digits  # an `examples` extra

    digits = load_digits()
    x = digits.images.astype(np.float32)
    y = digits.target.astype(np.int64)
    tr, va, te = split_indices(y, val_fraction, test_fraction, seed, stratify)
    return Splits(_take(x, y, tr), _take(x, y, va), _take(x, y, te),
                  source=f"scikit-learn digits (8x8): {len(tr)} train / "
                         f"{len(va)} validation / {len(te)} test")


# -- CIFAR-10 -----------------------------------------------------------------

CIFAR10_DIRNAME = "cifar-10-batches-py"
CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCH = "test_batch"


def _safe_globals() -> Dict[Tuple[str, str], object]:
    # The callables numpy's own pickles name, taken from numpy itself so that
    # no deprecated module (numpy.core) is imported to resolve them.
    reconstruct = np.empty(0).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    frombuffer = np.empty(0).__reduce_ex__(5)[0]
    table = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
             # Python 3 pickles bytes with protocol <= 2 as this call.
             ("_codecs", "encode"): codecs.encode}
    for module in ("numpy.core", "numpy._core"):
        table[(module + ".multiarray", "_reconstruct")] = reconstruct
        table[(module + ".multiarray", "scalar")] = scalar
        table[(module + ".numeric", "_frombuffer")] = frombuffer
    return table


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only dicts of bytes/str/int/list and numpy arrays.

    ``pickle`` runs any callable a file names, so loading a downloaded
    pickle with plain :func:`pickle.load` executes whatever its author put
    there. The CIFAR-10 batches need no global beyond numpy's array and
    scalar reconstructors (dicts, lists, ints, bytes and str are pickle
    opcodes), so every other global is refused.
    """
    _ALLOWED = _safe_globals()

    def find_class(self, module, name):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to unpickle the global {module}.{name}: a "
                "CIFAR-10 batch holds only a dict of bytes, lists, ints and "
                "numpy arrays") from None


def _find_key(batch: dict, name: str, path: pathlib.Path):
    for key in (name.encode(), name):
        if key in batch:
            return batch[key]
    raise ValueError(f"{path}: the batch dict has no {name.encode()!r} key "
                     f"(keys: {sorted(map(repr, batch))}); expected a "
                     "CIFAR-10 python batch.")


def read_cifar10_batch(path: PathLike) -> Pair:
    """Reads one CIFAR-10 python batch (a pickled dict) safely.

    The dict's ``b"data"`` is an ``(N, 3072)`` ``uint8`` array whose rows
    hold the red, then green, then blue 32×32 planes (channel-major, rows
    in order); ``b"labels"`` is a list of N ints in 0–9. The file is read
    with a restricted unpickler that can only rebuild dicts, lists, bytes,
    str, ints and numpy arrays (a pickle can otherwise run arbitrary code).

    Args:
      path: the batch file (``data_batch_1`` … or ``test_batch``).

    Returns:
      ``(images, labels)``: ``uint8`` ``(N, 32, 32, 3)`` (height, width,
      RGB) and ``int64`` ``(N,)``.

    Raises:
      FileNotFoundError: the file is missing.
      ValueError: it is not a valid batch (the message names it and says
        what was expected).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; expected a CIFAR-10 python batch "
            "(download_cifar10(data_dir) fetches them).")
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError,
            AttributeError, IndexError, KeyError, OverflowError) as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 batch ({err}); "
                         "expected a pickled dict with b'data' and "
                         "b'labels'.") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: unpickled a {type(batch).__name__}; "
                         "expected a dict with b'data' and b'labels'.")
    data = _find_key(batch, "data", path)
    labels = np.asarray(_find_key(batch, "labels", path))
    if (not isinstance(data, np.ndarray) or data.dtype != np.uint8
            or data.ndim != 2 or data.shape[1] != 3072):
        got = (f"{data.dtype} array of shape {data.shape}"
               if isinstance(data, np.ndarray) else type(data).__name__)
        raise ValueError(f"{path}: b'data' is a {got}; expected a uint8 "
                         "array of shape (N, 3072).")
    if (labels.shape != (len(data),)
            or not np.issubdtype(labels.dtype, np.integer)
            or (labels.size and (labels.min() < 0 or labels.max() > 9))):
        raise ValueError(f"{path}: b'labels' must be {len(data)} integers in "
                         f"0-9 (one per row of b'data'); got {labels.dtype} "
                         f"of shape {labels.shape}.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels.astype(np.int64)


def _cifar10_dir(data_dir: PathLike) -> pathlib.Path:
    path = _existing_dir(data_dir)
    names = CIFAR10_TRAIN_BATCHES + (CIFAR10_TEST_BATCH,)
    for candidate in (path, path / CIFAR10_DIRNAME):
        if any((candidate / name).is_file() for name in names):
            return candidate
    raise FileNotFoundError(
        f"no CIFAR-10 batches in {path} nor in {path / CIFAR10_DIRNAME}; "
        f"expected {', '.join(names)} (download_cifar10(data_dir) fetches "
        "them).")


def load_cifar10(data_dir: PathLike, split: str = "train") -> Pair:
    """Reads the CIFAR-10 training or test set from the python batches.

    Args:
      data_dir: the ``cifar-10-batches-py`` directory or its parent.
      split: ``"train"`` (``data_batch_1`` … ``data_batch_5``, 50,000
        images) or ``"test"`` (``test_batch``, 10,000).

    Returns:
      ``(images, labels)``: ``uint8`` ``(N, 32, 32, 3)`` and ``int64``
      ``(N,)`` (see :func:`read_cifar10_batch`).

    Raises:
      FileNotFoundError: the directory or a batch is missing.
      ValueError: a batch is corrupt.
    """
    val.check_choice(split, "split", ("train", "test"))
    root = _cifar10_dir(data_dir)
    names = CIFAR10_TRAIN_BATCHES if split == "train" else (
        CIFAR10_TEST_BATCH,)
    parts = [read_cifar10_batch(root / name) for name in names]
    return (np.concatenate([p[0] for p in parts]),
            np.concatenate([p[1] for p in parts]))


def load_cifar10_splits(data_dir: PathLike, val_fraction: float = 0.1,
                        seed: int = 0, stratify: bool = True) -> Splits:
    """CIFAR-10: training batches split into train / validation; test batch.

    Args:
      data_dir: the ``cifar-10-batches-py`` directory or its parent.
      val_fraction: validation share of the training images.
      seed: seed of the split.
      stratify: keep the class proportions.

    Returns:
      A :class:`Splits` of ``uint8`` ``(n, 32, 32, 3)`` images and ``int64``
      labels.
    """
    x, y = load_cifar10(data_dir, "train")
    tr, va, _ = split_indices(y, val_fraction, 0.0, seed, stratify)
    test = load_cifar10(data_dir, "test")
    return Splits(_take(x, y, tr), _take(x, y, va), test,
                  source=f"CIFAR-10 from {data_dir}: {len(tr)} train / "
                         f"{len(va)} validation / {len(test[1])} test")


# -- normalisation and batching -----------------------------------------------

def standardize(train: np.ndarray, *others: np.ndarray
                ) -> Tuple[np.ndarray, ...]:
    r"""Standardises every array with the per-feature statistics of ``train``.

    .. math::

       \tilde x_{ij} = (x_{ij} - \mu_j) / s_j, \qquad
       \mu_j = \operatorname{mean}_i x^{tr}_{ij}, \quad
       s_j = \operatorname{std}_i x^{tr}_{ij}\ (1 \text{ where it is } 0),

    over the first axis, so a feature is one pixel (or one channel of one
    pixel). Constant features (MNIST's borders) are only centred. The
    statistics come from ``train`` alone, so nothing leaks from validation
    or test.

    Args:
      train: the training inputs, shape ``(N, ...)``.
      *others: validation / test inputs with the same feature shape.

    Returns:
      A tuple ``(train, *others)`` standardised, in float32 (float64 if
      ``train`` is float64).

    Example:
      >>> a, b = standardize(np.array([[0.0], [2.0]]), np.array([[4.0]]))
      >>> a.ravel().tolist(), b.ravel().tolist()
      ([-1.0, 1.0], [3.0])
    """
    train = np.asarray(train)
    dtype = np.result_type(train.dtype, np.float32)
    stats = train.astype(np.float64)
    mean = stats.mean(axis=0)
    std = stats.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    out = []
    for x in (train,) + others:
        x = np.asarray(x)
        if x.shape[1:] != train.shape[1:]:
            raise ValueError(f"every array must have the feature shape "
                             f"{train.shape[1:]} of train; got {x.shape}.")
        out.append(((x - mean) / std).astype(dtype))
    return tuple(out)


def one_hot(labels: np.ndarray, num_classes: Optional[int] = None,
            dtype=np.float32) -> np.ndarray:
    """One-hot encodes integer labels.

    Args:
      labels: integers in ``[0, num_classes)``, any shape.
      num_classes: number of classes (default: ``max(labels) + 1``).
      dtype: output dtype.

    Returns:
      An array of shape ``labels.shape + (num_classes,)``.

    Example:
      >>> one_hot(np.array([2, 0]), 3)
      array([[0., 0., 1.],
             [1., 0., 0.]], dtype=float32)
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integers, got dtype {labels.dtype}.")
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.size else 0
    num_classes = val.check_int(num_classes, "num_classes", minimum=1)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}); got values "
                         f"in [{labels.min()}, {labels.max()}].")
    return np.eye(num_classes, dtype=dtype)[labels]


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int,
            epochs: Optional[int] = None) -> Iterator[Pair]:
    """Deterministic shuffled minibatches of a fixed size.

    Each epoch draws a fresh permutation from one ``numpy`` Generator seeded
    with ``seed`` and yields ``len(x) // batch_size`` batches, dropping the
    remainder: every batch has exactly ``batch_size`` rows, so a jitted step
    sees one shape and compiles once (a smaller last batch would retrace).
    The same seed gives the same sequence.

    Args:
      x, y: inputs and targets with the same first axis.
      batch_size: rows per batch (at most ``len(x)``).
      seed: seed of the shuffle.
      epochs: number of passes (``None``: forever).

    Yields:
      ``(x_batch, y_batch)`` numpy arrays.

    Example:
      >>> it = batches(np.arange(5), np.arange(5) * 10, 2, seed=0, epochs=2)
      >>> [xb.shape for xb, _ in it]
      [(2,), (2,), (2,), (2,)]
    """
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same first axis; got "
                         f"{len(x)} and {len(y)}.")
    batch_size = val.check_int(batch_size, "batch_size")
    if batch_size > len(x):
        raise ValueError(f"batch_size must be at most len(x) = {len(x)}; "
                         f"got {batch_size}.")
    seed = val.check_int(seed, "seed", minimum=0)
    if epochs is not None:
        epochs = val.check_int(epochs, "epochs", minimum=0)
    return _batches(x, y, batch_size, seed, epochs)


def _batches(x, y, batch_size, seed, epochs):
    # A generator of its own so that the checks above run at the call.
    rng = np.random.default_rng(seed)
    epoch = 0
    while epochs is None or epoch < epochs:
        perm = rng.permutation(len(x))
        for start in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[start:start + batch_size]
            yield x[idx], y[idx]
        epoch += 1


# -- downloads (never automatic) ----------------------------------------------

MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
#: md5 of the four official MNIST files (gzipped).
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def file_md5(path: PathLike) -> str:
    """Hex md5 of a file, read in 1 MiB chunks."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _check_md5(md5: str, name: str) -> str:
    if not (isinstance(md5, str) and len(md5) == 32
            and all(c in "0123456789abcdef" for c in md5.lower())):
        raise ValueError(f"{name} must be a 32-digit hex md5, got {md5!r}.")
    return md5.lower()


def download_file(url: str, path: PathLike, md5: str,
                  timeout: float = 60.0) -> pathlib.Path:
    """Downloads ``url`` to ``path`` and verifies its md5; never keeps a bad
    file.

    A file already at ``path`` with the right md5 is kept (no network). The
    download goes to ``path + ".part"`` and is renamed only once its md5
    matches; on a mismatch or a network error the partial file is deleted.

    Args:
      url: any URL ``urllib`` opens (``https://``, ``file://``).
      path: where the file goes.
      md5: the expected hex md5.
      timeout: seconds before a stalled connection fails.

    Returns:
      ``path``.

    Raises:
      ValueError: the downloaded file's md5 differs from ``md5`` (nothing is
        written to ``path``).
      OSError: the download failed.
    """
    md5 = _check_md5(md5, "md5")
    path = pathlib.Path(path)
    if path.is_file():
        if file_md5(path) == md5:
            return path
        logger.warning("%s exists but its md5 is not %s; downloading it "
                       "again.", path, md5)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, \
                open(part, "wb") as out:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != md5:
            raise ValueError(
                f"checksum mismatch for {url}: expected md5 {md5}, got "
                f"{digest.hexdigest()}; the download was deleted and nothing "
                f"was written to {path}.")
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)
    return path


def download_mnist(data_dir: PathLike,
                   urls: Optional[Mapping[str, str]] = None,
                   md5: Optional[Mapping[str, str]] = None,
                   timeout: float = 60.0) -> pathlib.Path:
    """Downloads the gzipped MNIST IDX files into ``data_dir``, md5-checked.

    Only called explicitly: no loader downloads.

    Args:
      data_dir: destination directory (created if needed).
      urls: file name -> URL for the files to fetch (default: the four files
        from :data:`MNIST_URL`).
      md5: file name -> expected md5 (default :data:`MNIST_MD5`); every file
        in ``urls`` must have one.
      timeout: seconds per connection.

    Returns:
      ``data_dir`` as a path, ready for :func:`load_mnist`.

    Raises:
      ValueError: a checksum is missing or a download does not match it.
    """
    if urls is None:
        urls = {name: MNIST_URL + name for name in MNIST_MD5}
    md5 = MNIST_MD5 if md5 is None else md5
    missing = [name for name in urls if name not in md5]
    if missing:
        raise ValueError(f"md5 has no checksum for {missing}; every file in "
                         "urls must be verified.")
    data_dir = pathlib.Path(data_dir).expanduser()
    for name, url in urls.items():
        download_file(url, data_dir / name, md5[name], timeout)
    return data_dir


def _safe_members(tar: tarfile.TarFile, path: pathlib.Path) -> Sequence:
    members = tar.getmembers()
    for m in members:
        parts = pathlib.PurePosixPath(m.name).parts
        if (m.name.startswith("/") or ".." in parts
                or not (m.isfile() or m.isdir())):
            raise ValueError(f"{path}: refusing to extract {m.name!r} (only "
                             "plain files under a relative path are "
                             "expected).")
    return members


def download_cifar10(data_dir: PathLike, url: str = CIFAR10_URL,
                     md5: str = CIFAR10_MD5,
                     timeout: float = 60.0) -> pathlib.Path:
    """Downloads and extracts the CIFAR-10 python tarball, md5-checked.

    The tarball goes to ``data_dir/cifar-10-python.tar.gz`` (kept, so a
    second call does not download again) and is extracted into ``data_dir``
    after its md5 matched; members with absolute paths, ``..`` or links are
    refused.

    Args:
      data_dir: destination directory (created if needed).
      url: the tarball's URL.
      md5: its expected md5 (default :data:`CIFAR10_MD5`).
      timeout: seconds per connection.

    Returns:
      The ``cifar-10-batches-py`` directory, ready for :func:`load_cifar10`.

    Raises:
      ValueError: the md5 does not match, or the tarball is unsafe.
    """
    data_dir = pathlib.Path(data_dir).expanduser()
    tar_path = download_file(url, data_dir / "cifar-10-python.tar.gz", md5,
                             timeout)
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            members = _safe_members(tar, tar_path)
            kwargs = ({"filter": "data"} if hasattr(tarfile, "data_filter")
                      else {})
            tar.extractall(data_dir, members=members, **kwargs)
    except tarfile.TarError as err:
        raise ValueError(f"{tar_path}: not a readable tar.gz ({err}).") \
            from err
    return data_dir / CIFAR10_DIRNAME
