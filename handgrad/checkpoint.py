"""Checkpoints: a pytree and a training history in one ``.npz``, written crash-safe.

``save_checkpoint`` writes a temporary file, flushes it to disk and renames it over the old
checkpoint, so a crash at any moment leaves the previous checkpoint or the new one, whole;
``load_checkpoint`` refuses, naming the file, one that is damaged or of another structure.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# --- checkpoints -----------------------------------------------------------------------------

# What reading a damaged file raises: truncated (no zip directory), empty, garbage, bad CRC.
_DAMAGE = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, zlib.error)


def save_checkpoint(path: str | os.PathLike, tree, *,
                    history: Sequence[dict] | None = None) -> Path:
    """Save a pytree (params, optimizer state, …) and, optionally, a training history as one
    ``.npz``.

    Crash-safe: written to a temporary file beside ``path``, flushed to disk (``fsync``) and
    only then renamed over ``path`` (atomic), so ``path`` always holds either the previous
    checkpoint or this one, whole. On any error the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = _encode(tree)
    if history is not None:
        arrays["__history__"] = np.array(json.dumps(list(history)))
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as file:
            np.savez(file, **arrays)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)  # the rename itself survives a power cut
    return path


class Checkpoint(NamedTuple):
    tree: Any
    history: list[dict] | None  # None when saved without one


def load_checkpoint(path: str | os.PathLike, like):
    """Load a checkpoint written by :func:`save_checkpoint` into the structure of ``like``.

    Raises ValueError naming the path when the file is damaged (truncated, empty, not a
    checkpoint) or when the structure, a shape or a dtype differs (a checkpoint of another
    model or optimizer); FileNotFoundError when it is missing.
    """
    return read_checkpoint(path, like).tree


def read_checkpoint(path: str | os.PathLike, like) -> Checkpoint:
    """The tree (in the structure of ``like``) and the history saved at ``path``; raises like
    :func:`load_checkpoint`."""
    path = Path(path)
    stored = _read(path)
    if "__structure__" not in stored or "__dtypes__" not in stored:
        raise ValueError(f"checkpoint {path} is in an older format or not a checkpoint (no "
                         "structure and dtype record); train again to write a current one")
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if str(stored["__structure__"]) != str(treedef):
        raise ValueError(
            f"checkpoint {path} has another structure than the model/optimizer state: stored "
            f"{str(stored['__structure__'])[:200]}…, expected {str(treedef)[:200]}…"
        )
    names = [str(n) for n in stored["__dtypes__"]]
    if len(names) != len(leaves) or any(f"leaf_{i:05d}" not in stored for i in range(len(names))):
        raise ValueError(f"checkpoint {path} is damaged: its leaves do not match its record")
    loaded = [_restore_leaf(stored[f"leaf_{i:05d}"], name) for i, name in enumerate(names)]
    for i, (want, got) in enumerate(zip(leaves, loaded)):
        if jnp.issubdtype(jnp.result_type(want), jax.dtypes.prng_key):
            want = jax.random.key_data(want)
        want = np.asarray(want)
        if want.shape != got.shape or want.dtype != got.dtype:
            raise ValueError(f"checkpoint {path}: leaf {i} is {got.dtype}{list(got.shape)}, "
                             f"expected {want.dtype}{list(want.shape)}")
    tree = jax.tree_util.tree_unflatten(
        treedef, [jax.random.wrap_key_data(leaf, impl=name[4:]) if name.startswith("key:")
                  else jnp.asarray(leaf) for leaf, name in zip(loaded, names)])
    history = json.loads(str(stored["__history__"])) if "__history__" in stored else None
    return Checkpoint(tree, history)


def _encode(tree) -> dict[str, np.ndarray]:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    # Typed PRNG keys (jax.random.key) are stored as their raw data, tagged with their impl.
    names = [f"key:{jax.random.key_impl(leaf)}"
             if jnp.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key) else None
             for leaf in leaves]
    leaves = [np.asarray(jax.random.key_data(leaf)) if name else np.asarray(leaf)
              for leaf, name in zip(leaves, names)]
    # .npz cannot name bfloat16 (it would store raw void bytes): keep each leaf's dtype name
    # and store the bits of such leaves as unsigned integers of the same width.
    dtypes = np.array([name or leaf.dtype.name for leaf, name in zip(leaves, names)])
    arrays = {f"leaf_{i:05d}": leaf if leaf.dtype.isbuiltin else leaf.view(f"u{leaf.itemsize}")
              for i, leaf in enumerate(leaves)}
    return {"__structure__": np.array(str(treedef)), "__dtypes__": dtypes, **arrays}


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # a platform that cannot open directories (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` at ``path``; a file that cannot be read whole is damaged."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError("a single .npy array, not an .npz archive")
        with data:
            return {name: data[name] for name in data.files}
    except _DAMAGE as error:
        raise ValueError(
            f"checkpoint {path} is damaged (truncated, empty or not an .npz file) and cannot "
            f"be loaded: {type(error).__name__}: {error}"
        ) from error


def _restore_leaf(leaf: np.ndarray, name: str) -> np.ndarray:
    if name.startswith("key:") or leaf.dtype.name == name:
        return leaf
    return leaf.view(jnp.dtype(name))  # bfloat16 & co., stored as same-width unsigned ints
