"""Datasets for training, host side (NumPy): images float32 in [0, 1], NCHW with one channel.

    ds = load("digits", seed=0)                    # sklearn's bundled 8×8 digits, no download
    ds = load("mnist", data_dir="~/data/mnist")    # your own IDX (plain or .gz) or mnist.npz
    ds = load("mnist", download=True)              # fetched once, SHA-256 verified, cached
    text = load_text(seq_len=64)                   # Python's own help topics, characters
    for xb, yb in batches(ds.x_train, ds.y_train, 128, seed=0, epoch=3):
        ...                                        # same (seed, epoch) → same order, on resume too

Nothing is downloaded unless asked: MNIST and Fashion-MNIST are read from files you already
have, or fetched with :func:`fetch` (``download=True``) from their canonical mirrors, each file
checked against the SHA-256 in :data:`REMOTE` and cached in ``$HANDGRAD_DATA`` (default: the
platform's user cache directory).
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

from handgrad._download import (
    ChecksumError as ChecksumError,
)
from handgrad._download import (
    DownloadError as DownloadError,
)
from handgrad._download import RemoteFile, cache_root, download_verified

DATASETS = ("digits", "mnist", "fashion-mnist", "text")
MNIST_KINDS = ("mnist", "fashion-mnist")
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dims (N, rows, cols)
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dim (N,)
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# The published files and their SHA-256 (the same digests torchvision, TensorFlow Datasets and
# the datasets' own pages give). Mirrors are tried in order.
REMOTE: dict[str, dict[str, RemoteFile]] = {
    "mnist": {
        "x_train": RemoteFile("train-images-idx3-ubyte.gz",
                              "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                              9912422),
        "y_train": RemoteFile("train-labels-idx1-ubyte.gz",
                              "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                              28881),
        "x_test": RemoteFile("t10k-images-idx3-ubyte.gz",
                             "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                             1648877),
        "y_test": RemoteFile("t10k-labels-idx1-ubyte.gz",
                             "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                             4542),
    },
    "fashion-mnist": {
        "x_train": RemoteFile("train-images-idx3-ubyte.gz",
                              "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                              26421880),
        "y_train": RemoteFile("train-labels-idx1-ubyte.gz",
                              "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                              29515),
        "x_test": RemoteFile("t10k-images-idx3-ubyte.gz",
                             "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                             4422102),
        "y_test": RemoteFile("t10k-labels-idx1-ubyte.gz",
                             "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                             5148),
    },
}
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
MIRROR_ENV = "HANDGRAD_DATA_MIRROR"


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


def _labels(y: np.ndarray, where: str, num_classes: int = 10) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: expected integer labels (N,), got {y.dtype} {y.shape}")
    outside = (y < 0) | (y >= num_classes)
    if outside.any():
        first = int(np.argmax(outside))
        raise ValueError(
            f"{where}: {int(outside.sum())} labels outside [0, {num_classes}), the first "
            f"{int(y[first])} at index {first}; the file is damaged or not a {num_classes}-class "
            f"label file"
        )
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


def fetch(name: str, cache_dir: str | os.PathLike | None = None, *,
          mirrors: tuple[str, ...] | None = None, progress: bool = True) -> Path:
    """Download MNIST or Fashion-MNIST's four files once and return their directory.

    Each file is checked against its SHA-256 in :data:`REMOTE`; files already in the cache
    that verify are not downloaded again, and an interrupted download continues where it
    stopped. A mismatch deletes the file and raises :class:`ChecksumError`; no reachable
    mirror raises :class:`DownloadError` naming what was tried.

    Args:
      name: "mnist" or "fashion-mnist".
      cache_dir: where the files go (a subdirectory ``name`` of it); default ``$HANDGRAD_DATA``
        or the platform's user cache directory + ``handgrad``.
      mirrors: base URLs to try in order; default ``$HANDGRAD_DATA_MIRROR`` (one URL) or
        :data:`MIRRORS`.
      progress: show a progress bar per file.
    """
    if name not in REMOTE:
        raise ValueError(f"fetch: `name` must be one of {tuple(REMOTE)}, got {name!r}")
    if mirrors is None:
        override = os.environ.get(MIRROR_ENV)
        mirrors = (override,) if override else MIRRORS[name]
    directory = Path(cache_dir if cache_dir is not None else cache_root()).expanduser() / name
    for remote in REMOTE[name].values():
        download_verified(remote, mirrors, directory, progress=progress)
    return directory


def load(name: str, data_dir: str | os.PathLike | None = None, seed: int = 0, *,
         download: bool = False, **text_options) -> Dataset:
    """Load a dataset by name: "digits" (bundled, split by ``seed``), "mnist" or
    "fashion-mnist" (from ``data_dir``, or fetched into the cache with ``download=True``),
    "text" (:func:`load_text`: Python's help topics, or the file ``data_dir`` names)."""
    if name == "digits":
        return load_digits(seed=seed)
    if name in MNIST_KINDS:
        if download:
            data_dir = fetch(name, data_dir)
        if data_dir is None:
            raise ValueError(
                f"{name} is not bundled: pass `data_dir`, a directory with the four IDX files "
                f"or {name}.npz, or download=True to fetch them (SHA-256 verified)"
            )
        return load_mnist(data_dir, kind=name)
    if name == "text":
        return load_text(data_dir, seed=seed, **text_options)
    raise ValueError(f"unknown dataset {name!r}, expected one of {DATASETS}")


# --- text: characters of a real corpus, next-character targets ------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class TextDataset(Dataset):
    """Character-level language-model data: x (N, T) int32 character ids, y (N, T) the next
    characters (x shifted by one), ``num_classes`` = the vocabulary size; ``x_test``/``y_test``
    are the validation windows. ``vocab[i]`` is the character of id ``i``."""

    vocab: str = ""
    source: str = ""
    unigram_bits: float = float("nan")

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted(set(text) - set(index))
        if unknown:
            raise ValueError(f"encode: characters not in the vocabulary: {unknown[:10]}")
        return np.array([index[c] for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in np.asarray(ids).ravel())

    def __repr__(self) -> str:
        return (
            f"TextDataset({self.source!r}, train={len(self.x_train)}×{self.x_train.shape[1]}, "
            f"valid={len(self.x_test)}×{self.x_test.shape[1]}, vocab={len(self.vocab)})"
        )


def python_help_text() -> str:
    """The corpus shipped with every CPython: the text of ``help("topics")``, i.e. the
    language reference's sections as ``pydoc`` shows them (``pydoc_data.topics``, ~460 kB
    of English prose and code; its exact text varies a little between Python versions)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(path: str | os.PathLike | None = None, *, seq_len: int = 64,
              valid_fraction: float = 0.1, chunk_len: int = 2048, seed: int = 0) -> TextDataset:
    """A character-level corpus cut into training and validation windows.

    The text (``path``, UTF-8, or :func:`python_help_text`) is cut into contiguous chunks of
    ``chunk_len`` characters; a seeded random ``valid_fraction`` of the chunks is held out for
    validation, so no window is in both. Each chunk yields non-overlapping windows of
    ``seq_len + 1`` characters: x the first ``seq_len``, y the last ``seq_len``.

    ``unigram_bits`` is the cross-entropy, in bits per character, of the validation text under
    the training text's character frequencies (add-one smoothed): what a model that ignores
    context scores, the baseline a language model must beat.
    """
    if seq_len < 1 or chunk_len < seq_len + 1:
        raise ValueError(f"load_text: need 1 ≤ `seq_len` (={seq_len}) < `chunk_len` "
                         f"(={chunk_len})")
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"load_text: `valid_fraction` must be in (0, 1), got {valid_fraction}")
    if path is None:
        text, source = python_help_text(), "python-help-topics"
    else:
        path = Path(path).expanduser()
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"text file not found: {path}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 text ({error})") from None
        source = str(path)
    n_chunks = len(text) // chunk_len
    if n_chunks < 2:
        raise ValueError(
            f"{source}: {len(text)} characters make fewer than 2 chunks of `chunk_len` "
            f"(={chunk_len}); a training and a validation part need at least 2"
        )
    vocab = "".join(sorted(set(text)))
    lookup = {c: i for i, c in enumerate(vocab)}
    ids = np.array([lookup[c] for c in text[: n_chunks * chunk_len]], np.int32)
    chunks = ids.reshape(n_chunks, chunk_len)
    order = np.random.default_rng(seed).permutation(n_chunks)
    n_valid = min(max(1, round(valid_fraction * n_chunks)), n_chunks - 1)
    valid, train = chunks[np.sort(order[:n_valid])], chunks[np.sort(order[n_valid:])]

    def windows(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        per_chunk = chunk_len // (seq_len + 1)
        w = part[:, : per_chunk * (seq_len + 1)].reshape(-1, seq_len + 1)
        return np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])

    counts = np.bincount(train.ravel(), minlength=len(vocab)) + 1.0
    log_p = np.log2(counts / counts.sum())
    unigram_bits = float(-np.mean(log_p[valid.ravel()]))
    (x_train, y_train), (x_test, y_test) = windows(train), windows(valid)
    return TextDataset(x_train, y_train, x_test, y_test, num_classes=len(vocab), name="text",
                       vocab=vocab, source=source, unigram_bits=unigram_bits)


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
