"""handgrad.data.fetch: downloads verified by SHA-256, cached, resumed — against a local server.

Every test serves generated IDX files from an ``http.server`` on 127.0.0.1 and points the
mirror at it; no test touches the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import socket
import threading

import numpy as np
import pytest

from handgrad import data
from handgrad._download import RemoteFile


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves ``self.server.files`` (name → bytes) under /mnist/, honouring ``Range: bytes=N-``
    when ``self.server.ranges``; ``self.server.cut`` (name → n) closes the connection after n
    bytes, once. Every request is logged in ``self.server.log`` as (name, range header)."""

    def do_GET(self):
        server = self.server
        name = self.path.rsplit("/", 1)[-1]
        server.log.append((name, self.headers.get("Range")))
        body = server.files.get(name) if self.path.startswith("/mnist/") else None
        if body is None:
            self.send_error(404)
            return
        start = 0
        if server.ranges and self.headers.get("Range", "").startswith("bytes="):
            start = int(self.headers["Range"][6:].split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = server.cut.pop(name, None)
        self.wfile.write(body[start:cut] if cut is not None else body[start:])
        if cut is not None:
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Files)
    httpd.files, httpd.log, httpd.cut, httpd.ranges = {}, [], {}, True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/mnist/"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _publish(server, monkeypatch, seed=0):
    """Generated MNIST-shaped files on the server, and a REMOTE table with their digests."""
    rng = np.random.default_rng(seed)
    arrays = {"x_train": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
              "y_train": rng.integers(0, 10, 12, dtype=np.uint8),
              "x_test": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
              "y_test": rng.integers(0, 10, 5, dtype=np.uint8)}
    table = {}
    for key, array in arrays.items():
        header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
        body = gzip.compress(header + array.tobytes(), mtime=0)
        name = data.IDX_FILES[key] + ".gz"
        server.files[name] = body
        table[key] = RemoteFile(name, hashlib.sha256(body).hexdigest(), len(body))
    monkeypatch.setitem(data.REMOTE, "mnist", table)
    return arrays


def test_fetch_downloads_verifies_and_loads(server, monkeypatch, tmp_path):
    arrays = _publish(server, monkeypatch)
    ds = data.load("mnist", tmp_path, download=True)
    np.testing.assert_array_equal(ds.y_train, arrays["y_train"])
    np.testing.assert_allclose(ds.x_test[:, 0] * 255, arrays["x_test"], atol=1e-4)
    assert len(server.log) == 4  # the mirror is $HANDGRAD_DATA_MIRROR (the fixture below)
    assert not list((tmp_path / "mnist").glob("*.part"))


@pytest.fixture(autouse=True)
def _mirror_is_the_local_server(request, monkeypatch):
    if "server" in request.fixturenames:
        monkeypatch.setenv(data.MIRROR_ENV, request.getfixturevalue("server").url)


def test_verified_files_are_not_downloaded_again(server, monkeypatch, tmp_path):
    _publish(server, monkeypatch)
    data.fetch("mnist", tmp_path, progress=False)
    server.log.clear()
    data.fetch("mnist", tmp_path, progress=False)
    assert server.log == []


def test_a_damaged_cached_file_is_downloaded_again(server, monkeypatch, tmp_path):
    _publish(server, monkeypatch)
    directory = data.fetch("mnist", tmp_path, progress=False)
    victim = directory / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(b"garbage")
    server.log.clear()
    data.fetch("mnist", tmp_path, progress=False)
    assert [name for name, _ in server.log] == [victim.name]
    assert hashlib.sha256(victim.read_bytes()).hexdigest() == data.REMOTE["mnist"]["y_test"].sha256


def test_checksum_mismatch_removes_the_file_and_says_so(server, monkeypatch, tmp_path):
    _publish(server, monkeypatch)
    server.files["train-labels-idx1-ubyte.gz"] = b"x" * data.REMOTE["mnist"]["y_train"].size
    with pytest.raises(data.ChecksumError, match=r"train-labels-idx1-ubyte.gz: SHA-256 "
                                                 r"[0-9a-f]{64} does not match the expected"):
        data.fetch("mnist", tmp_path, progress=False)
    left = {p.name for p in (tmp_path / "mnist").iterdir()}
    assert "train-labels-idx1-ubyte.gz" not in left and not any(n.endswith(".part") for n in left)


def test_an_interrupted_download_resumes_with_a_range_request(server, monkeypatch, tmp_path):
    _publish(server, monkeypatch)
    name = "train-images-idx3-ubyte.gz"
    size = len(server.files[name])
    server.cut[name] = size // 3  # the first attempt stops a third of the way in
    with pytest.raises(data.DownloadError, match=name):
        data.fetch("mnist", tmp_path, progress=False)
    part = tmp_path / "mnist" / (name + ".part")
    assert part.stat().st_size == size // 3
    server.log.clear()
    data.fetch("mnist", tmp_path, progress=False)
    assert (name, f"bytes={size // 3}-") in server.log
    assert hashlib.sha256((tmp_path / "mnist" / name).read_bytes()).hexdigest() == \
        data.REMOTE["mnist"]["x_train"].sha256


def test_a_server_without_ranges_restarts_the_download(server, monkeypatch, tmp_path):
    _publish(server, monkeypatch)
    server.ranges = False
    name = "t10k-images-idx3-ubyte.gz"
    part = tmp_path / "mnist" / (name + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(server.files[name][:100])
    data.fetch("mnist", tmp_path, progress=False)
    assert hashlib.sha256((tmp_path / "mnist" / name).read_bytes()).hexdigest() == \
        data.REMOTE["mnist"]["x_test"].sha256


def test_offline_is_a_clear_error(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(data.MIRROR_ENV, f"http://127.0.0.1:{port}/mnist/")
    with pytest.raises(data.DownloadError, match=r"could not download train-images-idx3-ubyte.gz"
                                                 r".*127\.0\.0\.1.*Offline\?"):
        data.fetch("mnist", tmp_path, progress=False)


def test_missing_file_on_the_mirror_and_a_second_mirror(server, monkeypatch, tmp_path):
    _publish(server, monkeypatch)
    good = server.url
    bad = good.replace("/mnist/", "/elsewhere/")
    del server.files["t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(data.DownloadError, match="404"):
        data.fetch("mnist", tmp_path, mirrors=(bad,), progress=False)
    _publish(server, monkeypatch)
    directory = data.fetch("mnist", tmp_path, mirrors=(bad, good), progress=False)
    assert (directory / "t10k-labels-idx1-ubyte.gz").is_file()


def test_the_cache_directory_comes_from_the_environment(monkeypatch, tmp_path):
    from handgrad._download import cache_root

    monkeypatch.setenv("HANDGRAD_DATA", str(tmp_path / "hg"))
    assert cache_root() == tmp_path / "hg"
    monkeypatch.delenv("HANDGRAD_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("sys.platform", "linux")
    assert cache_root() == tmp_path / "xdg" / "handgrad"


def test_fetch_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match=r"fetch: `name` must be one of \('mnist', "
                                         r"'fashion-mnist'\), got 'cifar'"):
        data.fetch("cifar", tmp_path)


def test_the_published_table_is_well_formed():
    for name, files in data.REMOTE.items():
        assert set(files) == set(data.IDX_FILES), name
        for remote in files.values():
            assert len(remote.sha256) == 64 and int(remote.sha256, 16) >= 0
            assert remote.size > 0 and remote.name.endswith(".gz")
        assert data.MIRRORS[name]
