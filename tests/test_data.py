"""handgrad.data: digits split, IDX reading/writing, MNIST-style loading and its errors, batches."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from handgrad import data
from handgrad.data import (
    IDX_FILES,
    Dataset,
    batches,
    load,
    load_digits,
    load_mnist,
    num_batches,
    read_idx,
    write_idx,
)

N_TRAIN, N_TEST = 20, 10


# ---------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits() -> Dataset:
    pytest.importorskip("sklearn")
    return load_digits(seed=0)


def test_digits_shapes_dtypes_range(digits):
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.x_train.shape == (1437, 1, 8, 8)
    assert digits.x_test.shape == (360, 1, 8, 8)
    assert digits.y_train.shape == (1437,) and digits.y_test.shape == (360,)
    assert digits.x_train.dtype == np.float32 and digits.x_test.dtype == np.float32
    assert digits.y_train.dtype == np.int32 and digits.y_test.dtype == np.int32
    for x in (digits.x_train, digits.x_test):
        assert x.min() == 0.0 and x.max() == 1.0  # 0..16 divided by 16
    assert set(np.unique(digits.y_train)) == set(range(10))
    assert digits.image_shape == (1, 8, 8)


def test_digits_split_is_stratified(digits):
    y_all = np.concatenate([digits.y_train, digits.y_test])
    full = np.bincount(y_all, minlength=10)
    test = np.bincount(digits.y_test, minlength=10)
    # Stratified: each class's test count is its share of 20%, give or take rounding. A plain
    # random split misses this by ~5 examples per class.
    np.testing.assert_array_less(np.abs(test - 0.2 * full), 1.0 + 1e-9)


def test_digits_split_is_seeded(digits):
    again = load_digits(seed=0)
    np.testing.assert_array_equal(again.x_test, digits.x_test)
    np.testing.assert_array_equal(again.y_train, digits.y_train)
    other = load_digits(seed=1)
    assert not np.array_equal(other.x_test, digits.x_test)


def test_digits_test_fraction():
    pytest.importorskip("sklearn")
    assert len(load_digits(test_fraction=0.5).x_test) == 899  # ceil(1797 / 2)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)


def test_flat_and_repr(digits):
    flat = digits.flat()
    assert flat.x_train.shape == (1437, 64) and flat.x_test.shape == (360, 64)
    assert flat.image_shape == (64,)
    np.testing.assert_array_equal(flat.x_train[5], digits.x_train[5].ravel())
    flat.x_train[0, 0] = 123.0  # a copy: the original is untouched
    assert digits.x_train[0, 0, 0, 0] != 123.0
    assert digits.x_train.shape == (1437, 1, 8, 8)
    text = repr(digits)
    assert "digits" in text and "1437" in text and "360" in text and "(1, 8, 8)" in text


def test_dataset_rejects_length_mismatch():
    x = np.zeros((3, 1, 2, 2), np.float32)
    with pytest.raises(ValueError, match="x_train has 3 examples but y_train has 2"):
        Dataset(x, np.zeros(2, np.int32), x, np.zeros(3, np.int32), num_classes=2, name="t")


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (4, 28, 28), (2, 3, 5)])
def test_idx_round_trip(tmp_path, suffix, shape):
    a = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = write_idx(tmp_path / f"a{suffix}", a)
    raw = path.read_bytes()
    if suffix:
        assert raw[:2] == b"\x1f\x8b"  # really gzipped
        raw = gzip.decompress(raw)
    assert raw[:4] == bytes([0, 0, 8, len(shape)])
    assert int.from_bytes(raw[4:8], "big") == shape[0]
    b = read_idx(path)
    assert b.dtype == np.uint8 and b.shape == shape
    np.testing.assert_array_equal(a, b)


def test_write_idx_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "a", np.zeros(3, np.int64))


def test_read_idx_expected_magic(tmp_path):
    path = write_idx(tmp_path / "labels", np.zeros(5, np.uint8))
    assert read_idx(path, data.IDX_LABELS_MAGIC).shape == (5,)
    with pytest.raises(ValueError, match="got 0x00000801, expected 0x00000803") as e:
        read_idx(path, data.IDX_IMAGES_MAGIC)
    assert str(path) in str(e.value)


def test_read_idx_not_uint8_idx(tmp_path):
    path = tmp_path / "junk"
    path.write_bytes(b"\x50\x4b\x03\x04" + bytes(10))
    with pytest.raises(ValueError, match="0x504b0304") as e:
        read_idx(path)
    assert str(path) in str(e.value)


def test_read_idx_truncated_header(tmp_path):
    path = tmp_path / "short"
    path.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 1]))
    with pytest.raises(ValueError, match="expected 16 bytes for 3 dims, got 8"):
        read_idx(path)


def test_read_idx_bad_gzip(tmp_path):
    path = write_idx(tmp_path / "a.gz", np.zeros((2, 28, 28), np.uint8))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match="gzip") as e:
        read_idx(path)
    assert str(path) in str(e.value)


# ---------------------------------------------------------------- load_mnist


def _arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, size=(N_TRAIN, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, size=N_TRAIN, dtype=np.uint8),
        "x_test": rng.integers(0, 256, size=(N_TEST, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, size=N_TEST, dtype=np.uint8),
    }


def _write_mnist(directory: Path, arrays: dict[str, np.ndarray], suffix: str = "") -> dict:
    return {key: write_idx(directory / f"{IDX_FILES[key]}{suffix}", a) for key, a in arrays.items()}


def _check_loaded(ds: Dataset, arrays: dict[str, np.ndarray], name: str) -> None:
    assert ds.name == name and ds.num_classes == 10
    assert ds.x_train.shape == (N_TRAIN, 1, 28, 28) and ds.x_test.shape == (N_TEST, 1, 28, 28)
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
    assert ds.y_test.dtype == np.int32
    np.testing.assert_allclose(ds.x_train[:, 0] * 255, arrays["x_train"], atol=1e-4)
    np.testing.assert_allclose(ds.x_test[:, 0] * 255, arrays["x_test"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_array_equal(ds.y_test, arrays["y_test"])
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_mnist_idx(tmp_path, suffix):
    arrays = _arrays()
    _write_mnist(tmp_path, arrays, suffix)
    _check_loaded(load_mnist(tmp_path), arrays, "mnist")
    _check_loaded(load(name="fashion-mnist", data_dir=str(tmp_path)), arrays, "fashion-mnist")


def test_load_mnist_idx_mixed_plain_and_gz(tmp_path):
    arrays = _arrays()
    paths = _write_mnist(tmp_path, arrays)
    write_idx(tmp_path / f"{IDX_FILES['x_train']}.gz", arrays["x_train"])
    paths["x_train"].unlink()
    _check_loaded(load_mnist(tmp_path), arrays, "mnist")


@pytest.mark.parametrize("kind", ["mnist", "fashion-mnist"])
def test_load_mnist_npz(tmp_path, kind):
    arrays = _arrays(seed=1)
    np.savez(tmp_path / f"{kind}.npz", **arrays)
    _check_loaded(load_mnist(tmp_path, kind=kind), arrays, kind)


def test_load_mnist_npz_missing_key(tmp_path):
    arrays = _arrays()
    del arrays["y_test"]
    np.savez(tmp_path / "mnist.npz", **arrays)
    with pytest.raises(ValueError, match="y_test") as e:
        load_mnist(tmp_path)
    assert str(tmp_path / "mnist.npz") in str(e.value)


def test_load_mnist_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="directory not found") as e:
        load_mnist(missing)
    assert str(missing) in str(e.value)


def test_load_mnist_empty_dir_lists_names(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_mnist(tmp_path, kind="fashion-mnist")
    msg = str(e.value)
    assert str(tmp_path) in msg and "fashion-mnist.npz" in msg
    for name in IDX_FILES.values():
        assert name in msg


def test_load_mnist_missing_file(tmp_path):
    paths = _write_mnist(tmp_path, _arrays())
    paths["y_test"].unlink()
    with pytest.raises(FileNotFoundError, match="missing: t10k-labels-idx1-ubyte") as e:
        load_mnist(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_load_mnist_wrong_magic(tmp_path):
    arrays = _arrays()
    arrays["x_test"] = arrays["y_test"]  # a labels file where the images belong
    paths = _write_mnist(tmp_path, arrays)
    with pytest.raises(ValueError, match="got 0x00000801, expected 0x00000803") as e:
        load_mnist(tmp_path)
    assert str(paths["x_test"]) in str(e.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_load_mnist_truncated(tmp_path, suffix):
    paths = _write_mnist(tmp_path, _arrays(), suffix)
    path = paths["x_train"]
    raw = gzip.decompress(path.read_bytes()) if suffix else path.read_bytes()
    raw = raw[:-100]
    path.write_bytes(gzip.compress(raw) if suffix else raw)
    expected = N_TRAIN * 28 * 28
    pattern = rf"expected {expected} bytes of data .* got {expected - 100}"
    with pytest.raises(ValueError, match=pattern) as e:
        load_mnist(tmp_path)
    assert str(path) in str(e.value)


def test_load_mnist_count_mismatch(tmp_path):
    arrays = _arrays()
    arrays["y_train"] = arrays["y_train"][:-1]
    paths = _write_mnist(tmp_path, arrays)
    with pytest.raises(ValueError, match=f"{N_TRAIN} images .* {N_TRAIN - 1} labels") as e:
        load_mnist(tmp_path)
    assert str(paths["x_train"]) in str(e.value) and str(paths["y_train"]) in str(e.value)


def test_load_mnist_unsupported_kind(tmp_path):
    with pytest.raises(ValueError, match=r"kmnist.*fashion-mnist"):
        load_mnist(tmp_path, kind="kmnist")


# ---------------------------------------------------------------- load


def test_load_dispatch(digits):
    ds = load("digits", seed=0)
    np.testing.assert_array_equal(ds.x_test, digits.x_test)
    assert not np.array_equal(load("digits", seed=3).x_test, digits.x_test)


def test_load_errors():
    with pytest.raises(
        ValueError, match=r"unknown dataset 'cifar10'.*digits.*mnist.*fashion-mnist"
    ):
        load("cifar10")
    with pytest.raises(ValueError, match="pass `data_dir`"):
        load("mnist")


# ---------------------------------------------------------------- batches


def _xy(n: int = 23) -> tuple[np.ndarray, np.ndarray]:
    x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
    return x, np.arange(n, dtype=np.int32)


def _order(**kw) -> np.ndarray:
    x, y = _xy()
    return np.concatenate([yb for _, yb in batches(x, y, 5, **kw)])


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_cover_every_example_once(shuffle):
    x, y = _xy()
    out = list(batches(x, y, 5, seed=7, epoch=2, shuffle=shuffle))
    assert [len(yb) for _, yb in out] == [5, 5, 5, 5, 3]
    assert len(out) == num_batches(23, 5)
    for xb, yb in out:  # x and y stay paired
        np.testing.assert_array_equal(xb[:, 0], 2 * yb)
    order = np.concatenate([yb for _, yb in out])
    np.testing.assert_array_equal(np.sort(order), y)
    assert np.array_equal(order, y) != shuffle


def test_batches_deterministic_per_seed_and_epoch():
    np.testing.assert_array_equal(_order(seed=3, epoch=4), _order(seed=3, epoch=4))
    assert not np.array_equal(_order(seed=3, epoch=4), _order(seed=3, epoch=5))
    assert not np.array_equal(_order(seed=3, epoch=4), _order(seed=4, epoch=4))
    np.testing.assert_array_equal(_order(), _order(seed=0))  # seed defaults to 0


def test_batches_jax_key():
    import jax

    for key in (jax.random.key(1), jax.random.PRNGKey(1)):
        np.testing.assert_array_equal(_order(key=key, epoch=1), _order(key=key, epoch=1))
        assert not np.array_equal(_order(key=key, epoch=1), _order(key=key, epoch=2))
    np.testing.assert_array_equal(_order(key=jax.random.key(1)), _order(key=jax.random.PRNGKey(1)))
    with pytest.raises(ValueError, match="not both"):
        _order(key=jax.random.key(1), seed=1)


def test_batches_drop_remainder():
    x, y = _xy()
    out = list(batches(x, y, 5, seed=0, drop_remainder=True))
    assert [len(yb) for _, yb in out] == [5, 5, 5, 5]
    assert len(out) == num_batches(23, 5, drop_remainder=True) == 4
    assert len(np.unique(np.concatenate([yb for _, yb in out]))) == 20
    assert num_batches(20, 5) == num_batches(20, 5, drop_remainder=True) == 4
    assert num_batches(3, 5) == 1 and num_batches(3, 5, drop_remainder=True) == 0


@pytest.mark.parametrize("batch_size", [0, -2])
def test_batches_bad_batch_size(batch_size):
    x, y = _xy()
    with pytest.raises(ValueError, match=f"batch_size must be positive, got {batch_size}"):
        batches(x, y, batch_size)  # raised at the call, not at the first next()
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(10, batch_size)


def test_batches_length_mismatch():
    x, y = _xy()
    with pytest.raises(ValueError, match="same length, got 23 and 22"):
        batches(x, y[:-1], 5)
