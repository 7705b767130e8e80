"""`download` against a local HTTP server: SHA-256 checked, nothing half-written on failure."""

import functools
import hashlib
import http.server
import io
import tarfile
import threading

import numpy as np
import pytest

from sparsevl.classify.cli import main
from sparsevl.classify.data import load_dataset
from sparsevl.classify.download import ChecksumError, download


@pytest.fixture
def served_cifar(tmp_path):
    """A tiny cifar-10-binary.tar.gz served on 127.0.0.1; yields (url, sha256)."""
    site = tmp_path / "site"
    site.mkdir()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            record = np.concatenate([[3], np.full(3072, 7)]).astype(np.uint8).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(record)
            tar.addfile(info, io.BytesIO(record))
    (site / "cifar-10-binary.tar.gz").write_bytes(buffer.getvalue())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/cifar-10-binary.tar.gz", hashlib.sha256(buffer.getvalue()).hexdigest()
    server.shutdown()


def test_download_verifies_and_unpacks(served_cifar, tmp_path, capsys):
    url, sha256 = served_cifar
    root = tmp_path / "data"
    assert main(["download", "--dataset", "cifar10", "--root", str(root), "--url", url, "--sha256", sha256]) == 0
    assert (root / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin", "cifar-10-binary.tar.gz"]
    ds = load_dataset("cifar10", root, img_size=32, in_channels=3)
    assert ds.train.labels.tolist() == [3] * 5
    assert "cifar-10-batches-bin" in capsys.readouterr().out


def test_checksum_mismatch_leaves_no_file(served_cifar, tmp_path, capsys):
    url, _ = served_cifar
    root = tmp_path / "data"
    with pytest.raises(ChecksumError, match=r"cifar-10-binary.tar.gz: SHA-256 [0-9a-f]{64} does not match the expected 0{64}"):
        download("cifar10", root, url=url, sha256="0" * 64)
    assert list(root.iterdir()) == []
    assert main(["download", "--dataset", "cifar10", "--root", str(root), "--url", url, "--sha256", "0" * 64]) == 1
    assert "does not match" in capsys.readouterr().err
    assert list(root.iterdir()) == []


def test_unreachable_url_leaves_no_file(tmp_path):
    root = tmp_path / "data"
    with pytest.raises(OSError):
        download("cifar10", root, url="http://127.0.0.1:9/cifar-10-binary.tar.gz", sha256="0" * 64)
    assert list(root.iterdir()) == []


def test_multi_file_dataset_needs_mirror_folder(tmp_path):
    with pytest.raises(ValueError, match="fashion_mnist has 4 files; give --url as a mirror folder"):
        download("fashion_mnist", tmp_path, url="http://127.0.0.1:9/x.gz")
