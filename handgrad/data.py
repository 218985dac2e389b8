"""Datasets for training, host side (NumPy): images float32 in [0, 1], NCHW with one channel.

    ds = load("digits", seed=0)                    # sklearn's bundled 8×8 digits, no download
    ds = load("mnist", data_dir="~/data/mnist")    # your own IDX (plain or .gz) or mnist.npz
    for xb, yb in batches(ds.x_train, ds.y_train, 128, seed=0, epoch=3):
        ...                                        # same (seed, epoch) → same order, on resume too

Nothing is downloaded: MNIST and Fashion-MNIST are read from files you already have.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DATASETS = ("digits", "mnist", "fashion-mnist")
MNIST_KINDS = ("mnist", "fashion-mnist")
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim (N,)
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split: x float32 (N, 1, H, W) in [0, 1] (or (N, H·W) after ``flat()``),
    y int32 (N,) class indices in ``[0, num_classes)``."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise ValueError(
                    f"{self.name}: x_{split} has {len(x)} examples but y_{split} has {len(y)}"
                )

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one example: (1, H, W), or (H·W,) after ``flat()``."""
        return tuple(self.x_train.shape[1:])

    def flat(self) -> Dataset:
        """A copy with x reshaped to (N, H·W), for dense networks."""
        return dataclasses.replace(
            self,
            x_train=self.x_train.reshape(len(self.x_train), -1).copy(),
            x_test=self.x_test.reshape(len(self.x_test), -1).copy(),
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes})"
        )


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images), x (N, 1, 8, 8) = pixels/16.

    The train/test split is stratified by class and a deterministic function of ``seed``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    try:
        from sklearn.datasets import load_digits as sk_load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError('load_digits needs scikit-learn: pip install "handgrad[scripts]"') from e
    bunch = sk_load_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, random_state=seed, stratify=y
    )
    return Dataset(x_train, y_train, x_test, y_test, num_classes=10, name="digits")


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write a uint8 array (1 to 255 dims) as an IDX file, gzipped if ``path`` ends in ``.gz``.

    The inverse of ``read_idx``; handy to build small MNIST-like files for tests.
    """
    path = Path(path)
    a = np.asarray(array)
    if a.dtype != np.uint8:
        raise ValueError(f"write_idx({path}): expected a uint8 array, got {a.dtype}")
    if not 1 <= a.ndim <= 255:
        raise ValueError(f"write_idx({path}): expected 1 to 255 dims, got {a.ndim}")
    header = bytes([0, 0, 0x08, a.ndim]) + np.asarray(a.shape, dtype=">u4").tobytes()
    payload = header + np.ascontiguousarray(a).tobytes()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(payload)
    return path


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Read a uint8 IDX file (plain, or gzipped if ``path`` ends in ``.gz``) into an array.

    Images (magic 0x00000803) come back (N, rows, cols), labels (0x00000801) (N,), dtype uint8.
    With ``expected_magic`` any other magic number is an error.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    if path.name.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError; EOFError: cut short
            raise ValueError(f"{path}: not a valid gzip file ({e})") from e

    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file, expected a 4-byte header, got {len(raw)}")
    magic = int.from_bytes(raw[:4], "big")
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(
            f"{path}: wrong IDX magic number, got 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise ValueError(
            f"{path}: not a uint8 IDX file, got magic 0x{magic:08x}, expected 0x000008NN"
        )
    ndim = raw[3]
    start = 4 + 4 * ndim
    if len(raw) < start:
        raise ValueError(
            f"{path}: truncated IDX header, expected {start} bytes for {ndim} dims, got {len(raw)}"
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = math.prod(dims)
    got = len(raw) - start
    if got != expected:
        what = "truncated IDX file" if got < expected else "IDX file has trailing bytes"
        raise ValueError(
            f"{path}: {what}, expected {expected} bytes of data for shape {dims}, got {got}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=start).reshape(dims).copy()


def _find_idx(data_dir: Path, name: str) -> Path | None:
    for candidate in (data_dir / name, data_dir / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _images(x: np.ndarray, where: str) -> np.ndarray:
    if x.dtype != np.uint8 or x.ndim != 3:
        raise ValueError(f"{where}: expected uint8 images (N, H, W), got {x.dtype} {x.shape}")
    return (x[:, None, :, :] / np.float32(255.0)).astype(np.float32)


def _labels(y: np.ndarray, where: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: expected integer labels (N,), got {y.dtype} {y.shape}")
    return y.astype(np.int32)


def _check_counts(x: np.ndarray, y: np.ndarray, x_where: str, y_where: str) -> None:
    if len(x) != len(y):
        raise ValueError(
            f"image/label count mismatch: {len(x)} images in {x_where}, "
            f"{len(y)} labels in {y_where}"
        )


def load_mnist(data_dir: str | os.PathLike, kind: str = "mnist") -> Dataset:
    """MNIST or Fashion-MNIST from your own files in ``data_dir``: x (N, 1, 28, 28) = pixels/255.

    Reads the four standard IDX files (each plain or ``.gz``) if present, else ``<kind>.npz``
    with keys ``x_train, y_train, x_test, y_test`` (Keras's layout).
    """
    if kind not in MNIST_KINDS:
        raise ValueError(f"unsupported kind {kind!r}, expected one of {MNIST_KINDS}")
    data_dir = Path(data_dir).expanduser()
    if not data_dir.is_dir():
        raise FileNotFoundError(f"{kind} data directory not found: {data_dir}")

    found = {key: _find_idx(data_dir, name) for key, name in IDX_FILES.items()}
    npz_path = data_dir / f"{kind}.npz"
    if all(p is not None for p in found.values()):
        paths = {key: p for key, p in found.items() if p is not None}
        arrays = {
            key: read_idx(p, IDX_IMAGES_MAGIC if key.startswith("x") else IDX_LABELS_MAGIC)
            for key, p in paths.items()
        }
        where = {key: str(p) for key, p in paths.items()}
    elif npz_path.is_file():
        with np.load(npz_path) as npz:
            missing = [k for k in IDX_FILES if k not in npz.files]
            if missing:
                raise ValueError(
                    f"{npz_path}: missing keys {missing}, expected {list(IDX_FILES)}, "
                    f"found {npz.files}"
                )
            arrays = {key: npz[key] for key in IDX_FILES}
        where = {key: f"{npz_path}[{key}]" for key in IDX_FILES}
    else:
        missing = [name for key, name in IDX_FILES.items() if found[key] is None]
        raise FileNotFoundError(
            f"no {kind} data in {data_dir}: looked for the IDX files "
            f"{', '.join(f'{n}[.gz]' for n in IDX_FILES.values())} (missing: {', '.join(missing)}) "
            f"or {npz_path.name}"
        )

    for split in ("train", "test"):
        _check_counts(
            arrays[f"x_{split}"], arrays[f"y_{split}"], where[f"x_{split}"], where[f"y_{split}"]
        )
    return Dataset(
        x_train=_images(arrays["x_train"], where["x_train"]),
        y_train=_labels(arrays["y_train"], where["y_train"]),
        x_test=_images(arrays["x_test"], where["x_test"]),
        y_test=_labels(arrays["y_test"], where["y_test"]),
        num_classes=10,
        name=kind,
    )


def load(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """Load a dataset by name: "digits" (bundled, split by ``seed``), "mnist" or
    "fashion-mnist" (from ``data_dir``)."""
    if name == "digits":
        return load_digits(seed=seed)
    if name in MNIST_KINDS:
        if data_dir is None:
            raise ValueError(
                f"{name} is not bundled: pass `data_dir`, a directory with the four IDX files "
                f"or {name}.npz"
            )
        return load_mnist(data_dir, kind=name)
    raise ValueError(f"unknown dataset {name!r}, expected one of {DATASETS}")


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
    """How many batches ``batches`` yields for ``n`` examples."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _rng(seed: int | None, key: Any, epoch: int) -> np.random.Generator:
    if key is not None and seed is not None:
        raise ValueError("pass either seed or key, not both")
    if key is not None:
        import jax

        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        entropy = [int(v) for v in np.asarray(key).ravel()]
    else:
        entropy = [0 if seed is None else int(seed)]
    if min(entropy) < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    return np.random.default_rng([*entropy, epoch])


def batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    key: Any = None,
    seed: int | None = None,
    epoch: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = False,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate one epoch of ``(x[i], y[i])`` batches, each (B, ...) with B ≤ batch_size.

    The shuffle is a deterministic function of (seed, epoch), or of (key, epoch) for a JAX PRNG
    key; seed defaults to 0. A resumed run passing the same values sees exactly the same order.
    Arguments are checked here, not at the first ``next()``.
    """
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if epoch < 0:
        raise ValueError(f"epoch must be non-negative, got {epoch}")
    count = num_batches(len(x), batch_size, drop_remainder)
    order = _rng(seed, key, epoch).permutation(len(x)) if shuffle else np.arange(len(x))

    def gen() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(count):
            idx = order[i * batch_size : (i + 1) * batch_size]
            yield x[idx], y[idx]

    return gen()
