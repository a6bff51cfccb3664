import gzip
import hashlib
import http.server
import pickle
import re
import shutil
import threading
from pathlib import Path

import pytest
import torch

from normlab import data


@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_mnist_reads_shared_copy(data_root, split, n):
    x, y = data.load("mnist", split, root=data_root)
    assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (n,) and y.dtype == torch.int64
    assert 0 <= x.min() and x.max() <= 1
    counts = torch.bincount(y, minlength=10)
    assert counts.sum() == n and (counts > n // 20).all()


@pytest.mark.parametrize("split,n", [("train", 50000), ("test", 10000)])
def test_cifar10_reads_materialized_copy(data_root, split, n):
    x, y = data.load("cifar10", split, root=data_root)
    assert x.shape == (n, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(torch.bincount(y, minlength=10), torch.full((10,), n // 10))


def test_normalize_uses_training_statistics(data_root):
    train, _ = data.load("cifar10", "train", root=data_root, normalize=True)
    per_channel = train.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-3)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-3)
    mean, std = data.channel_stats("cifar10", data_root)
    # seed 003 quotes mean (0.4914, 0.4822, 0.4465) for the original CIFAR-10
    assert torch.allclose(mean, torch.tensor([0.4914, 0.4822, 0.4465]), atol=0.01)
    test, _ = data.load("cifar10", "test", root=data_root, normalize=True)
    raw_test, _ = data.load("cifar10", "test", root=data_root)
    assert torch.allclose(test, (raw_test - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))


@pytest.mark.usefixtures("needs_sklearn")
def test_digits_ships_with_scikit_learn():
    x_train, y_train = data.load("digits", "train")
    x_test, _ = data.load("digits", "test")
    assert x_train.shape[1:] == (1, 8, 8) and len(x_train) + len(x_test) == 1797
    assert 0 <= x_train.min() and x_train.max() <= 1 and y_train.max() == 9


def test_truncated_mnist_file_is_rejected_with_its_name(data_root, tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(data_root / "mnist", folder)
    victim = folder / "t10k-labels-idx1-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-100])
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", "test", root=tmp_path, download=False)


def test_altered_mnist_content_fails_the_checksum(data_root, tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(data_root / "mnist", folder)
    victim = folder / "t10k-images-idx3-ubyte.gz"
    content = bytearray(gzip.decompress(victim.read_bytes()))
    content[5000] ^= 0xFF
    victim.write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(data.DataError, match="corrupted.*t10k-images|t10k-images.*corrupted"):
        data.load("mnist", "test", root=tmp_path, download=False)


def test_corrupted_cifar_batch_is_rejected_with_its_name(data_root, tmp_path):
    shutil.copytree(data_root / "cifar-10-batches-py", tmp_path / "cifar-10-batches-py")
    victim = tmp_path / "cifar-10-batches-py" / "test_batch"
    victim.write_bytes(victim.read_bytes()[: 1 << 20])
    with pytest.raises(data.DataError, match="test_batch"):
        data.load("cifar10", "test", root=tmp_path, download=False)


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(data.DataError, match=str(tmp_path / "mnist")):
        data.load("mnist", "test", root=tmp_path, download=False)
    with pytest.raises(data.DataError, match="cifar-10-python.tar.gz"):
        data.load("cifar10", "test", root=tmp_path, download=False)


def test_root_falls_back_to_environment(monkeypatch, data_root):
    monkeypatch.setenv("NORMLAB_DATA", str(data_root))
    x, _ = data.load("mnist", "test")
    assert len(x) == 10000


def test_bad_names_are_rejected():
    with pytest.raises(ValueError, match="expected one of"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="split"):
        data.load("mnist", "validation")


def test_mnist_pixels_follow_the_idx_layout(data_root):
    # IDX: a 16-byte header, then each image's 28 rows of 28 bytes, row by row.
    raw = gzip.decompress((data_root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((data_root / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    x, y = data.load("mnist", "test", root=data_root)
    for k, row, col in [(0, 10, 20), (1, 5, 14), (123, 20, 9), (9999, 14, 3)]:
        assert x[k, 0, row, col] * 255 == raw[16 + 784 * k + 28 * row + col]
    torch.testing.assert_close(x[7, 0] * 255, torch.tensor(
        list(raw[16 + 784 * 7:16 + 784 * 8]), dtype=torch.float32).view(28, 28), rtol=0, atol=0)
    assert y[:10].tolist() == list(labels[8:18]) == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # The digits stand upright: a 1 is a vertical stroke, taller than it is wide.
    ones = x[y == 1, 0]
    rows, cols = torch.arange(28.0).view(28, 1), torch.arange(28.0).view(1, 28)

    def spread(index):
        mass = ones.sum((1, 2))
        mean = (ones * index).sum((1, 2)) / mass
        return ((ones * (index - mean.view(-1, 1, 1)) ** 2).sum((1, 2)) / mass).mean()
    assert spread(rows) > 3 * spread(cols)


def test_cifar10_pixels_follow_the_batch_layout(data_root):
    # Each row of a batch: 1024 red, 1024 green, 1024 blue bytes, each plane row by row.
    with open(data_root / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    x, y = data.load("cifar10", "test", root=data_root)
    for k, channel, row, col in [(0, 0, 3, 29), (1, 2, 30, 1), (5000, 1, 16, 8)]:
        assert x[k, channel, row, col] * 255 == batch[b"data"][k][1024 * channel + 32 * row + col]
    assert y[:5].tolist() == list(batch[b"labels"][:5])


@pytest.mark.usefixtures("needs_sklearn")
def test_digits_keep_scikit_learns_image_layout():
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float() / 16
    x, _ = data.load("digits", "train")
    x_test, _ = data.load("digits", "test")
    # every loaded image is one of scikit-learn's images as they are, not transposed
    found = (x[:20, 0].reshape(20, 1, 64) == images.reshape(1, -1, 64)).all(-1).any(-1)
    assert found.all()
    assert len(x) + len(x_test) == len(images)


class _Files(http.server.BaseHTTPRequestHandler):
    """Serves `routes`: path -> (status, body, declared length); a body shorter than its
    declared length is a connection dropped mid-transfer."""

    routes: dict = {}

    def do_GET(self):
        status, body, length = self.routes.get(self.path, (404, b"", 0))
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    """An HTTP server on the loopback address; returns (base URL, routes to fill)."""
    routes = {}
    handler = type("Handler", (_Files,), {"routes": routes})
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}", routes
        httpd.shutdown()


def _serve(routes, path, body, status=200, length=None):
    routes[path] = (status, body, len(body) if length is None else length)


def test_download_checks_the_md5_and_renames_the_part_file_only_when_complete(server,
                                                                              tmp_path):
    base, routes = server
    body = bytes(range(256)) * 4000
    _serve(routes, "/good", body)
    _serve(routes, "/cut", body[:1000], length=len(body))  # the connection drops
    md5 = hashlib.md5(body).hexdigest()
    dest = tmp_path / "file.bin"
    data._download(f"{base}/good", dest, md5=md5)
    assert dest.read_bytes() == body and not dest.with_name("file.bin.part").exists()
    for path, expected_md5 in (("/good", "0" * 32), ("/cut", md5), ("/cut", None)):
        target = tmp_path / f"again{path.replace('/', '-')}-{expected_md5}.bin"
        with pytest.raises(OSError):
            data._download(f"{base}{path}", target, md5=expected_md5)
        assert not target.exists()  # nothing incomplete or corrupted under the final name


def test_mnist_download_falls_back_to_the_second_mirror(server, tmp_path, monkeypatch,
                                                        data_root):
    base, routes = server
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        content = (data_root / "mnist" / name).read_bytes()
        _serve(routes, f"/cut/{name}", content[:len(content) // 2], length=len(content))
        _serve(routes, f"/good/{name}", content)
    for first in ("missing", "cut"):  # a 404, then a transfer that stops half-way
        monkeypatch.setattr(data, "MNIST_MIRRORS", (f"{base}/{first}/", f"{base}/good/"))
        root = tmp_path / first
        x, y = data.load("mnist", "test", root=root)
        expected_x, expected_y = data.load("mnist", "test", root=data_root)
        assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
        assert sorted(p.name for p in (root / "mnist").iterdir()) == [
            "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_downloaded_mnist_is_checked_and_failures_name_every_mirror(server, tmp_path,
                                                                    monkeypatch, data_root):
    base, routes = server
    name = "t10k-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress((data_root / "mnist" / name).read_bytes()))
    content[100] ^= 0xFF
    _serve(routes, f"/altered/{name}", gzip.compress(bytes(content)))
    monkeypatch.setattr(data, "MNIST_MIRRORS", (f"{base}/altered/",))
    with pytest.raises(data.DataError, match=f"corrupted.*{name}|{name}.*corrupted"):
        data._read_idx(tmp_path / "mnist", name, download=True)
    monkeypatch.setattr(data, "MNIST_MIRRORS", (f"{base}/a/", f"{base}/b/"))
    with pytest.raises(data.DataError, match=f"could not download.*{base}/a/.*{base}/b/"):
        data._read_idx(tmp_path / "elsewhere", name, download=True)


def test_cifar10_download_with_a_wrong_checksum_leaves_nothing_behind(server, tmp_path,
                                                                      monkeypatch):
    base, routes = server
    _serve(routes, "/cifar.tar.gz", b"not the archive" * 100)
    monkeypatch.setattr(data, "CIFAR10_URL", f"{base}/cifar.tar.gz")
    with pytest.raises(data.DataError, match="arrived corrupted"):
        data.load("cifar10", "test", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_download_creates_no_folder_and_names_the_data_root(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))  # nothing listens
    monkeypatch.setattr(data, "CIFAR10_URL", "http://127.0.0.1:9/cifar.tar.gz")
    root = tmp_path / "nowhere" / "data"
    for name in ("mnist", "cifar10"):
        with pytest.raises(data.DataError, match=re.escape(
                f"(data root {root}, the root argument)")):
            data.load(name, "test", root=root)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("NORMLAB_DATA", str(root))
    with pytest.raises(data.DataError, match=r"from \$NORMLAB_DATA\)"):
        data.load("mnist", "test")
    assert list(tmp_path.iterdir()) == []


class _RunsCode:
    """Pickles as a call of exec: what a tampered batch file could hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_a_cifar_batch_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "ran"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    payload = {b"data": _RunsCode(marker), b"labels": [0] * 10000}
    (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(data.DataError, match=r"test_batch is not a CIFAR-10 batch \(it asks "
                                             r"for __builtin__\.exec, and a batch holds only"):
        data.load("cifar10", "test", root=tmp_path, download=False)
    assert not marker.exists()
    pickle.loads(pickle.dumps(payload, protocol=2))  # the payload does run when unpickled
    assert marker.exists()


def test_cifar_batches_pickled_by_numpy_1_are_read(data_root, tmp_path):
    """The official files name numpy 1's module (numpy.core.multiarray); numpy 2 writes
    numpy._core.multiarray, as the materialized test copy does."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batch = (data_root / "cifar-10-batches-py" / "test_batch").read_bytes()
    numpy_1 = batch.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    assert numpy_1 != batch
    (folder / "test_batch").write_bytes(numpy_1)
    x, y = data.load("cifar10", "test", root=tmp_path, download=False)
    expected_x, expected_y = data.load("cifar10", "test", root=data_root)
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
