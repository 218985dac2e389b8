"""Downloading files once, verified: SHA-256 checked, cached, written atomically.

    path = download_verified(RemoteFile("t10k-labels-idx1-ubyte.gz", "f7ae…", 4542),
                             mirrors=["https://…/mnist/"], directory=cache / "mnist")

A file already in the cache whose SHA-256 matches is used as it is (no network). A file is
downloaded into ``<name>.part`` beside its final place — continued with an HTTP ``Range``
request when an earlier attempt left part of it and the server honours ranges — verified,
and only then renamed into place, so the cache never holds an unverified file under its real
name. A checksum mismatch deletes the download and raises :class:`ChecksumError`; no mirror
answering raises :class:`DownloadError` naming every URL tried and why.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_SECONDS = 30.0
_CHUNK = 1 << 16


class DownloadError(OSError):
    """No mirror delivered the file (offline, refused, HTTP error)."""


class ChecksumError(ValueError):
    """A downloaded file's SHA-256 differs from the expected one; the file was removed."""


@dataclass(frozen=True)
class RemoteFile:
    """A file as published: its name on the mirrors, SHA-256 (hex) and size in bytes."""

    name: str
    sha256: str
    size: int


def cache_root() -> Path:
    """``$HANDGRAD_DATA`` if set, else the platform's user cache directory + ``handgrad``."""
    if os.environ.get("HANDGRAD_DATA"):
        return Path(os.environ["HANDGRAD_DATA"]).expanduser()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    elif sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "handgrad"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def download_verified(remote: RemoteFile, mirrors: Sequence[str], directory: Path, *,
                      progress: bool = True) -> Path:
    """The verified file ``directory/remote.name``, downloaded from the first mirror that
    delivers it unless it is already there and verified."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / remote.name
    if final.is_file():
        if sha256_of(final) == remote.sha256:
            return final
        final.unlink()  # damaged or stale: fetch it again
    failures = []
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + remote.name
        part = directory / (remote.name + ".part")
        try:
            _fetch_into(url, part, remote.size, progress)
        except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
            # What arrived stays in the .part file: the next attempt continues from there.
            why = (f"HTTP {error.code} {error.reason}" if isinstance(error, urllib.error.HTTPError)
                   else getattr(error, "reason", error))
            failures.append(f"{url}: {why}")
            continue
        if part.stat().st_size < remote.size:
            failures.append(f"{url}: the connection closed after {part.stat().st_size} of "
                            f"{remote.size} bytes")
            continue
        got = sha256_of(part)
        if got != remote.sha256:
            part.unlink()
            raise ChecksumError(
                f"{url}: SHA-256 {got} does not match the expected {remote.sha256}; the "
                f"download was deleted. The mirror may serve another version of the file."
            )
        os.replace(part, final)
        return final
    raise DownloadError(
        f"could not download {remote.name} ({remote.size} bytes): "
        + "; ".join(failures)
        + f". Offline? Put the file in {directory} yourself, or pass other mirrors."
    )


def _fetch_into(url: str, part: Path, size: int, progress: bool) -> None:
    """Download ``url`` into ``part``, continuing a partial file with a Range request."""
    have = part.stat().st_size if part.is_file() else 0
    if have >= size:  # a complete (or oversized) leftover: start again
        part.unlink()
        have = 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
        resumed = have and response.status == 206
        mode, start = ("ab", have) if resumed else ("wb", 0)
        bar = _progress_bar(part.name[: -len(".part")], size, start, progress)
        try:
            with open(part, mode) as out:
                for block in iter(lambda: response.read(_CHUNK), b""):
                    out.write(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()


def _progress_bar(name: str, size: int, start: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=size, initial=start, unit="B", unit_scale=True, desc=name, leave=False)
