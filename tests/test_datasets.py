"""Data loaders of the examples (examples/data_utils.py): MNIST IDX,
CIFAR-10 batches, splits, batching, downloads.

The real MNIST test files come from ``../shared/data/mnist`` (skipped when
absent); every other file is written here, byte by byte from the format
specifications, so the loaders are checked against an independent
construction. Nothing touches the network (downloads use ``file://`` URLs).
"""

import doctest
import gzip
import hashlib
import importlib
import io
import itertools
import logging
import os
import pathlib
import pickle
import struct
import sys
import tarfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import data_utils  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_DIR = SHARED_DATA / "mnist"
README_MD5 = {  # /work/shared/data/README.md
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
# Counted once with gzip + numpy.bincount on the official t10k labels.
T10K_DIGIT_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]

needs_mnist = pytest.mark.skipif(
    not all((MNIST_DIR / name).is_file() for name in README_MD5),
    reason=f"the shared MNIST test files are not in {MNIST_DIR}")


# -- helpers that write the formats from their specifications -----------------

def idx_bytes(code, dims, payload):
    """An IDX file: 0, 0, type code, ndim, big-endian int32 dims, data."""
    return (bytes([0, 0, code, len(dims)])
            + b"".join(struct.pack(">i", d) for d in dims) + payload)


def write(path, data, gz):
    path = pathlib.Path(str(path) + (".gz" if gz else ""))
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(directory, prefix, images, labels, gz=True):
    """Writes an MNIST images/labels pair (uint8 arrays) as IDX files."""
    n, rows, cols = images.shape
    write(directory / f"{prefix}-images-idx3-ubyte",
          idx_bytes(0x08, (n, rows, cols), images.tobytes()), gz)
    write(directory / f"{prefix}-labels-idx1-ubyte",
          idx_bytes(0x08, (len(labels),), labels.tobytes()), gz)


def small_mnist(n, seed):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    return images, labels


def pixel(n, r, c, ch):
    """The value the CIFAR test files hold at image n, row r, col c, ch."""
    return (7 * n + 3 * r + 5 * c + 101 * ch) % 256


def cifar_batch_dict(first, count, labels):
    """A batch built row by row as the CIFAR-10 page describes it: 1024 red,
    then 1024 green, then 1024 blue values, each plane row-major."""
    data = np.zeros((count, 3072), np.uint8)
    for i in range(count):
        for ch in range(3):
            for r in range(32):
                for c in range(32):
                    data[i, ch * 1024 + r * 32 + c] = pixel(first + i, r, c,
                                                            ch)
    return {b"batch_label": b"test", b"labels": list(labels), b"data": data,
            b"filenames": [b"img%d.png" % (first + i) for i in range(count)]}


def legacy_pickle(obj):
    """Protocol 2 naming numpy.core, as older numpy (and the real files) do."""
    raw = pickle.dumps(obj, protocol=2)
    return raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")


@pytest.fixture
def cifar_dir(tmp_path):
    """5 training batches of 2 images and a test batch of 3, nested in
    cifar-10-batches-py; data_batch_2 is written the legacy way."""
    root = tmp_path / "cifar" / data_utils.CIFAR10_DIRNAME
    root.mkdir(parents=True)
    for b in range(5):
        batch = cifar_batch_dict(2 * b, 2, [(2 * b) % 10, (2 * b + 1) % 10])
        raw = (legacy_pickle(batch) if b == 1
               else pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
        (root / f"data_batch_{b + 1}").write_bytes(raw)
    (root / "test_batch").write_bytes(
        pickle.dumps(cifar_batch_dict(100, 3, [9, 0, 4])))
    return root


def md5_of(path):
    return hashlib.md5(pathlib.Path(path).read_bytes()).hexdigest()


# -- the real MNIST test set --------------------------------------------------

@needs_mnist
def test_shared_mnist_files_match_readme_checksums():
    for name, md5 in README_MD5.items():
        assert md5_of(MNIST_DIR / name) == md5
        assert data_utils.MNIST_MD5[name] == md5
    assert all(md5 in (SHARED_DATA / "README.md").read_text()
               for md5 in README_MD5.values())


@needs_mnist
def test_load_real_mnist_test_set():
    images, labels = data_utils.load_mnist(MNIST_DIR, split="test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == 9
    assert np.bincount(labels).tolist() == T10K_DIGIT_COUNTS
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # Independent read of image 0 from the gzip stream (16-byte header).
    with gzip.open(MNIST_DIR / "t10k-images-idx3-ubyte.gz") as f:
        f.seek(16)
        first = np.frombuffer(f.read(784), np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(images[0], first)
    assert int(images[0].sum()) == 18454
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data_utils.load_mnist(MNIST_DIR, split="train")


@needs_mnist
def test_real_mnist_test_only_split_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger=data_utils.logger.name):
        s = data_utils.load_mnist_splits(MNIST_DIR, seed=3)
    assert s.test_only
    assert "Only the MNIST test files" in s.note and "7000 train" in s.note
    assert any("Only the MNIST test files" in r.getMessage()
               for r in caplog.records)
    sizes = [len(p[0]) for p in (s.train, s.val, s.test)]
    assert sizes == [7000, 1000, 2000]
    # Together the three splits are the 10,000 images, digit for digit.
    labels = np.concatenate([s.train[1], s.val[1], s.test[1]])
    assert np.bincount(labels).tolist() == T10K_DIGIT_COUNTS
    # Stratified: each split holds each digit in proportion (+-2).
    for (_, y), size in zip((s.train, s.val, s.test), sizes):
        expected = np.array(T10K_DIGIT_COUNTS) * size / 10000
        assert np.all(np.abs(np.bincount(y, minlength=10) - expected) <= 2)


# -- IDX files written here ---------------------------------------------------

@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_small_files(tmp_path, gz):
    images, labels = small_mnist(12, seed=0)
    write_mnist(tmp_path, "t10k", images, labels, gz=gz)
    x, y = data_utils.load_mnist(tmp_path, split="test")
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert x.dtype == np.uint8 and y.dtype == np.int64


@pytest.mark.parametrize("code,dtype", [
    (0x08, ">u1"), (0x09, ">i1"), (0x0B, ">i2"), (0x0C, ">i4"),
    (0x0D, ">f4"), (0x0E, ">f8")])
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_every_type(tmp_path, code, dtype, gz):
    values = np.array([[0, 1, 2], [-3 if dtype != ">u1" else 3, 100, 127]])
    if dtype[1] == "f":
        values = values + 0.25
    payload = values.astype(dtype).tobytes()
    path = write(tmp_path / "a.idx", idx_bytes(code, (2, 3), payload), gz)
    out = data_utils.read_idx(path)
    assert out.shape == (2, 3) and out.dtype.isnative
    assert out.dtype == np.dtype(dtype).newbyteorder("=")
    np.testing.assert_array_equal(out, values)


def test_read_idx_rejects_unknown_type_code(tmp_path):
    path = tmp_path / "bad.idx"
    path.write_bytes(idx_bytes(0x0A, (1,), b"\x00"))
    with pytest.raises(ValueError, match="bad IDX magic.*bad.idx|bad.idx.*"
                                         "bad IDX magic"):
        data_utils.read_idx(path)


def test_mnist_corrupt_magic_names_file(tmp_path):
    images, labels = small_mnist(4, seed=1)
    write_mnist(tmp_path, "t10k", images, labels)
    # A labels header (2049) in the images file.
    bad = write(tmp_path / "t10k-images-idx3-ubyte",
                idx_bytes(0x08, (4 * 28 * 28,), images.tobytes()), True)
    with pytest.raises(ValueError) as err:
        data_utils.load_mnist(tmp_path, "test")
    assert str(bad) in str(err.value) and "2051" in str(err.value)


def test_mnist_truncated_data_names_file(tmp_path):
    images, labels = small_mnist(4, seed=2)
    write_mnist(tmp_path, "t10k", images, labels, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated") as err:
        data_utils.load_mnist(tmp_path, "test")
    assert str(path) in str(err.value) and "3136" in str(err.value)


def test_mnist_trailing_bytes_and_truncated_header(tmp_path):
    path = tmp_path / "x.idx"
    path.write_bytes(idx_bytes(0x08, (2,), b"\x01\x02\x03"))
    with pytest.raises(ValueError, match="trailing bytes"):
        data_utils.read_idx(path)
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="truncated IDX header"):
        data_utils.read_idx(path)


def test_mnist_count_mismatch_names_both_files(tmp_path):
    images, labels = small_mnist(5, seed=3)
    write_mnist(tmp_path, "t10k", images, labels[:4])
    with pytest.raises(ValueError, match="5 images.*4 labels") as err:
        data_utils.load_mnist(tmp_path, "test")
    assert "t10k-images-idx3-ubyte.gz" in str(err.value)
    assert "t10k-labels-idx1-ubyte.gz" in str(err.value)


def test_mnist_corrupt_gzip_and_missing_files(tmp_path):
    images, labels = small_mnist(3, seed=4)
    write_mnist(tmp_path, "t10k", images, labels)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-6])
    with pytest.raises(ValueError, match="corrupt gzip") as err:
        data_utils.load_mnist(tmp_path, "test")
    assert str(path) in str(err.value)
    path.unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data_utils.load_mnist(tmp_path, "test")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data_utils.load_mnist(tmp_path / "nowhere", "test")
    with pytest.raises(ValueError, match="split must be one of"):
        data_utils.load_mnist(tmp_path, "validation")


def test_full_mnist_splits_train_and_keeps_t10k_as_test(tmp_path):
    train = small_mnist(60, seed=5)
    test = small_mnist(20, seed=6)
    write_mnist(tmp_path, "train", *train)
    write_mnist(tmp_path, "t10k", *test, gz=False)
    s = data_utils.load_mnist_splits(tmp_path, val_fraction=0.2, seed=0)
    assert not s.test_only and s.note == ""
    np.testing.assert_array_equal(s.test[0], test[0])
    assert len(s.train[1]) == 48 and len(s.val[1]) == 12
    # Train and validation are a partition of the 60 training images.
    rows = {im.tobytes() for im in np.concatenate([s.train[0], s.val[0]])}
    assert rows == {im.tobytes() for im in train[0]}


def test_test_only_split_on_small_files(tmp_path, caplog):
    images, labels = small_mnist(100, seed=7)
    write_mnist(tmp_path, "t10k", images, labels)
    with caplog.at_level(logging.WARNING, logger=data_utils.logger.name):
        s = data_utils.load_mnist_splits(tmp_path, val_fraction=0.1,
                                         test_fraction=0.3, seed=1)
    assert s.test_only and "60 train / 10 validation / 30 test" in s.note
    assert caplog.records and s.note == caplog.records[-1].getMessage()
    with pytest.raises(ValueError, match="test_fraction"):
        data_utils.load_mnist_splits(tmp_path, test_fraction=0.0)


# -- splits -------------------------------------------------------------------

def test_split_indices_partition_sizes_determinism_strata():
    labels = np.repeat(np.arange(5), [40, 30, 20, 6, 4])  # N = 100
    tr, va, te = data_utils.split_indices(labels, 0.15, 0.25, seed=11)
    assert (len(tr), len(va), len(te)) == (60, 15, 25)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    for part, size in ((tr, 60), (va, 15), (te, 25)):
        counts = np.bincount(labels[part], minlength=5)
        assert np.all(np.abs(counts - np.array([40, 30, 20, 6, 4]) * size
                             / 100) <= 2)
    again = data_utils.split_indices(labels, 0.15, 0.25, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again))
    other = data_utils.split_indices(labels, 0.15, 0.25, seed=12)
    assert not np.array_equal(te, other[2])
    plain = data_utils.split_indices(labels, 0.15, 0.25, seed=11,
                                     stratify=False)
    assert [len(p) for p in plain] == [60, 15, 25]
    assert len(set(np.concatenate(plain).tolist())) == 100


def test_split_indices_rejects_bad_fractions():
    with pytest.raises(ValueError, match="val_fraction"):
        data_utils.split_indices(np.zeros(10), 1.0, 0.0, seed=0)
    with pytest.raises(ValueError, match="at least one training"):
        data_utils.split_indices(np.zeros(10), 0.5, 0.5, seed=0)
    with pytest.raises(TypeError, match="seed"):
        data_utils.split_indices(np.zeros(10), 0.1, 0.1, seed=0.5)


def test_digits_splits():
    s = data_utils.load_digits_splits(seed=0)
    a = data_utils.load_digits_splits(seed=0)
    b = data_utils.load_digits_splits(seed=1)
    assert [len(p[1]) for p in s[:3]] == [1079, 359, 359]
    assert s.train[0].shape[1:] == (8, 8) and s.train[0].dtype == np.float32
    assert s.note == "" and not s.test_only and "digits" in s.source
    np.testing.assert_array_equal(s.val[0], a.val[0])
    assert not np.array_equal(s.val[1], b.val[1])
    # The three splits are the 1,797 images, each once.
    from sklearn.datasets import load_digits
    allx = np.concatenate([p[0] for p in s[:3]]).reshape(-1, 64)
    ref = load_digits().data.astype(np.float32)
    order = np.lexsort(allx.T[::-1])
    np.testing.assert_array_equal(allx[order], ref[np.lexsort(ref.T[::-1])])


# -- CIFAR-10 -----------------------------------------------------------------

@pytest.mark.parametrize("nested", [True, False])
def test_cifar10_layout_pixel_by_pixel(cifar_dir, nested):
    where = cifar_dir.parent if nested else cifar_dir
    x, y = data_utils.load_cifar10(where, "train")
    assert x.shape == (10, 32, 32, 3) and x.dtype == np.uint8
    assert y.tolist() == list(range(10)) and y.dtype == np.int64
    n, r, c, ch = np.indices(x.shape)
    np.testing.assert_array_equal(x, pixel(n, r, c, ch))
    xt, yt = data_utils.load_cifar10(where, "test")
    n, r, c, ch = np.indices(xt.shape)
    np.testing.assert_array_equal(xt, pixel(n + 100, r, c, ch))
    assert yt.tolist() == [9, 0, 4]
    assert x[3, 1, 2, 2] == pixel(3, 1, 2, 2)  # image 3, row 1, col 2, blue


def test_cifar10_splits(cifar_dir):
    s = data_utils.load_cifar10_splits(cifar_dir, val_fraction=0.2, seed=0)
    assert [len(p[1]) for p in s[:3]] == [8, 2, 3]
    assert sorted(np.concatenate([s.train[1], s.val[1]]).tolist()) == list(
        range(10))


def test_cifar10_missing_and_corrupt_batches(cifar_dir, tmp_path):
    (cifar_dir / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        data_utils.load_cifar10(cifar_dir, "train")
    path = cifar_dir / "data_batch_4"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="data_batch_4"):
        data_utils.read_cifar10_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8),
                                   b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"shape \(N, 3072\)"):
        data_utils.read_cifar10_batch(path)
    path.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                                   b"labels": [0]}))
    with pytest.raises(ValueError, match="labels"):
        data_utils.read_cifar10_batch(path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        data_utils.load_cifar10(tmp_path / "empty")


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_cifar10_unpickler_refuses_other_globals(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((1, 3072), np.uint8),
                                   b"labels": [0], b"x": _Evil(str(target))}))
    with pytest.raises(ValueError, match="refusing to unpickle"):
        data_utils.read_cifar10_batch(path)
    assert not target.exists()


# -- normalisation and batching -----------------------------------------------

def test_standardize_uses_train_statistics():
    train = np.array([[1.0, 5.0], [3.0, 5.0]])
    other = np.array([[5.0, 7.0]])
    a, b = data_utils.standardize(train, other)
    # mean (2, 5), std (1, 0 -> 1)
    np.testing.assert_allclose(a, [[-1.0, 0.0], [1.0, 0.0]])
    np.testing.assert_allclose(b, [[3.0, 2.0]])
    assert a.dtype == np.float64
    (u,) = data_utils.standardize(np.arange(6, dtype=np.uint8).reshape(3, 2))
    assert u.dtype == np.float32
    np.testing.assert_allclose(u.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(u.std(0), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="feature shape"):
        data_utils.standardize(train, np.zeros((1, 3)))


def test_one_hot():
    out = data_utils.one_hot(np.array([[1, 0], [2, 1]]), 3)
    assert out.shape == (2, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out.argmax(-1), [[1, 0], [2, 1]])
    assert out.sum() == 4
    assert data_utils.one_hot(np.array([0, 3])).shape == (2, 4)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        data_utils.one_hot(np.array([3]), 3)


def test_batches_fixed_size_epochs_and_determinism():
    x = np.arange(10) * 10
    y = np.arange(10)
    got = list(data_utils.batches(x, y, 3, seed=4, epochs=2))
    assert len(got) == 6  # 3 per epoch, remainder of 1 dropped
    assert all(xb.shape == (3,) and yb.shape == (3,) for xb, yb in got)
    assert all(np.array_equal(xb, yb * 10) for xb, yb in got)
    for epoch in (got[:3], got[3:]):
        seen = np.concatenate([yb for _, yb in epoch])
        assert len(set(seen.tolist())) == 9  # no repeats within an epoch
    assert not np.array_equal(np.concatenate([b for _, b in got[:3]]),
                              np.concatenate([b for _, b in got[3:]]))
    again = list(data_utils.batches(x, y, 3, seed=4, epochs=2))
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(got, again))
    forever = data_utils.batches(x, y, 5, seed=0)
    assert len(list(itertools.islice(forever, 7))) == 7
    with pytest.raises(ValueError, match="batch_size"):
        data_utils.batches(x, y, 11, seed=0)
    with pytest.raises(ValueError, match="same first axis"):
        data_utils.batches(x, y[:5], 2, seed=0)


# -- downloads (file:// only) -------------------------------------------------

def test_download_file_verifies_md5(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello gradhpo" * 100)
    good = md5_of(src)
    dest = tmp_path / "out" / "file.bin"
    assert data_utils.download_file(src.as_uri(), dest, good) == dest
    assert dest.read_bytes() == src.read_bytes()
    # Present with the right md5: kept, the URL is not opened.
    data_utils.download_file((tmp_path / "absent").as_uri(), dest, good)
    bad_dest = tmp_path / "out" / "bad.bin"
    with pytest.raises(ValueError, match="checksum mismatch") as err:
        data_utils.download_file(src.as_uri(), bad_dest, "0" * 32)
    assert good in str(err.value)
    assert not bad_dest.exists()
    assert list((tmp_path / "out").iterdir()) == [dest]  # no .part left
    with pytest.raises(ValueError, match="32-digit hex"):
        data_utils.download_file(src.as_uri(), bad_dest, "abc")


def test_download_mnist_with_file_urls(tmp_path):
    images, labels = small_mnist(6, seed=8)
    write_mnist(tmp_path, "t10k", images, labels)
    names = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    urls = {n: (tmp_path / n).as_uri() for n in names}
    md5 = {n: md5_of(tmp_path / n) for n in names}
    out = data_utils.download_mnist(tmp_path / "dl", urls=urls, md5=md5)
    x, y = data_utils.load_mnist(out, "test")
    np.testing.assert_array_equal(x, images)
    # The published md5s refuse these files.
    with pytest.raises(ValueError, match="checksum mismatch"):
        data_utils.download_mnist(tmp_path / "dl2", urls=urls)
    assert not any((tmp_path / "dl2").iterdir())
    with pytest.raises(ValueError, match="no checksum"):
        data_utils.download_mnist(tmp_path / "dl3", urls={"x.gz": "file:///x"},
                                  md5={})


def test_download_cifar10_with_file_url(tmp_path, cifar_dir):
    tar_path = tmp_path / "made.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(cifar_dir, arcname=data_utils.CIFAR10_DIRNAME)
    dest = tmp_path / "dl"
    root = data_utils.download_cifar10(dest, url=tar_path.as_uri(),
                                       md5=md5_of(tar_path))
    assert root == dest / data_utils.CIFAR10_DIRNAME
    x, _ = data_utils.load_cifar10(dest)
    np.testing.assert_array_equal(x, data_utils.load_cifar10(cifar_dir)[0])
    with pytest.raises(ValueError, match="checksum mismatch"):
        data_utils.download_cifar10(tmp_path / "dl2", url=tar_path.as_uri())
    assert not any((tmp_path / "dl2").iterdir())


def test_download_cifar10_refuses_unsafe_members(tmp_path):
    tar_path = tmp_path / "evil.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        info = tarfile.TarInfo("../escape.txt")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"hi"))
    with pytest.raises(ValueError, match="refusing to extract"):
        data_utils.download_cifar10(tmp_path / "dl", url=tar_path.as_uri(),
                                    md5=md5_of(tar_path))
    assert not (tmp_path / "escape.txt").exists()


# -- doctests of the examples' support modules --------------------------------

@pytest.mark.parametrize("name", ["data_utils", "text_utils"])
def test_support_module_doctests(name):
    """The examples' data modules live outside the package, so pytest's
    ``--doctest-modules`` (``testpaths = tests gradhpo``) does not collect
    them: run their docstring examples here."""
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{name} has no doctests"
    assert result.failed == 0, f"{result.failed} doctest(s) of {name} failed"
