import gzip
import shutil

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
