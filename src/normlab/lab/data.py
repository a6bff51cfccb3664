"""Datasets: ``mnist``, ``cifar10`` and ``digits``, as tensors in memory.

`load` reads the official formats: the MNIST IDX ``.gz`` files in
``ROOT/mnist/`` and CIFAR-10's ``ROOT/cifar-10-batches-py/``. ROOT is the
`root` argument, else ``$NORMLAB_DATA``, else ``~/.cache/normlab``. Missing
files are downloaded from the usual mirrors and checked before use; a file
that fails its check is never used: the error names it, says where ROOT came
from and what to do. A download that fails leaves no folder behind. The
CIFAR-10 batches are unpickled by an unpickler that builds only what the
format holds (a tampered file cannot run code). ``digits`` is scikit-learn's
8x8 digits, which ship with the package (the offline fallback).
"""

from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist", "cifar10", "digits")
SPLITS = ("train", "test")

MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# md5 of the decompressed files, so that re-compressed copies pass too.
MNIST_FILES = {
    "train-images-idx3-ubyte.gz": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte.gz": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte.gz": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte.gz": "27ae3e4e09519cfbb04c329615203637",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


class DataError(RuntimeError):
    """A dataset file is missing, unreachable or corrupted."""


def default_root() -> Path:
    return Path(os.environ.get("NORMLAB_DATA") or Path.home() / ".cache" / "normlab")


def load(name: str, split: str = "train", root: str | os.PathLike | None = None,
         normalize: bool = False, download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: float32 (N, C, H, W) and int64 (N,).

    Shapes: mnist (N, 1, 28, 28), cifar10 (N, 3, 32, 32), digits (N, 1, 8, 8).
    Pixels are in [0, 1]; with ``normalize=True`` each channel is shifted and
    scaled by the mean and standard deviation of the *training* split (the
    same statistics for both splits, as section 4.2 of the anonymous ICLR
    2019 reproducibility report "Reproducibility of Equi-normalization of
    Neural Networks" explains).

    Example:
        >>> x, y = normlab.data.load("mnist", "test", root="../shared/data")
        >>> x.shape, y.shape
        (torch.Size([10000, 1, 28, 28]), torch.Size([10000]))
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {DATASETS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    pixels, labels = _read(name, split, root, download)
    images = torch.from_numpy(pixels).float().div_(_PIXEL_MAX[name])
    if normalize:
        mean, std = channel_stats(name, root, download)
        images = (images - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return images, torch.from_numpy(labels).long()


@functools.lru_cache(maxsize=8)  # seconds for CIFAR-10, and every run of a sweep needs them
def channel_stats(name: str, root: str | os.PathLike | None = None,
                  download: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of the training split, in [0, 1] units."""
    pixels, _ = _read(name, "train", root, download)
    x = torch.from_numpy(pixels).double().div_(_PIXEL_MAX[name]).transpose(0, 1).flatten(1)
    return x.mean(1).float(), x.std(1).float()


_PIXEL_MAX = {"mnist": 255.0, "cifar10": 255.0, "digits": 16.0}


def _read(name: str, split: str, root: str | os.PathLike | None, download: bool):
    """`_load_uint8` at `root` (None: the default root); a `DataError` says where ROOT
    came from, since a user who did not choose it cannot fix it otherwise."""
    if root is not None:
        origin = "the root argument"
    elif os.environ.get("NORMLAB_DATA"):
        origin = "from $NORMLAB_DATA"
    else:
        origin = "the default: set $NORMLAB_DATA or pass root= to read another folder"
    folder = (Path(root) if root is not None else default_root()).expanduser().resolve()
    try:
        return _load_uint8(name, split, folder, download)
    except DataError as err:
        raise DataError(f"{err} (data root {folder}, {origin})") from err


@functools.lru_cache(maxsize=8)
def _load_uint8(name: str, split: str, root: Path, download: bool):
    if name == "mnist":
        return _load_mnist(split, root / "mnist", download)
    if name == "cifar10":
        return _load_cifar10(split, root, download)
    return _load_digits(split)


# -- MNIST -------------------------------------------------------------------

def _load_mnist(split: str, folder: Path, download: bool):
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(folder, f"{prefix}-images-idx3-ubyte.gz", download)
    labels = _read_idx(folder, f"{prefix}-labels-idx1-ubyte.gz", download)
    return images.reshape(-1, 1, 28, 28), labels


def _read_idx(folder: Path, filename: str, download: bool) -> np.ndarray:
    path = folder / filename
    if not path.exists():
        if not download:
            raise DataError(f"missing {path}: put the official MNIST file {filename} there")
        _download_mnist(path)
    content = _decompressed_or_error(path)
    if hashlib.md5(content).hexdigest() != MNIST_FILES[filename]:
        raise DataError(
            f"{path} is corrupted (its decompressed md5 does not match the official file); "
            f"delete it and put the official MNIST {filename} there, or let normlab download it"
        )
    ndim = content[3]
    shape = np.frombuffer(content, ">u4", count=ndim, offset=4)
    pixels = np.frombuffer(content, np.uint8, offset=4 + 4 * ndim)
    return pixels.reshape(shape.astype(int)).copy()  # frombuffer is read-only


def _decompressed_or_error(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError) as err:
        raise DataError(
            f"{path} is truncated or not a gzip file ({err}); delete it and put the "
            f"official file there, or let normlab download it"
        ) from err


def _download_mnist(path: Path) -> None:
    errors = []
    for mirror in MNIST_MIRRORS:
        try:
            _download(mirror + path.name, path)
            return
        except OSError as err:
            errors.append(f"{mirror}: {err}")
    raise DataError(
        f"missing {path} and could not download it ({'; '.join(errors)}); "
        f"put the official MNIST file {path.name} there"
    )


# -- CIFAR-10 ----------------------------------------------------------------

def _load_cifar10(split: str, root: Path, download: bool):
    folder = root / CIFAR10_DIR
    if not folder.exists():
        if not download:
            raise DataError(f"missing {folder}: extract the official cifar-10-python.tar.gz "
                            f"into {root}")
        _download_cifar10(root)
    pixels, labels = [], []
    for batch in CIFAR10_BATCHES[split]:
        data, batch_labels = _read_cifar_batch(folder / batch)
        pixels.append(data)
        labels.append(batch_labels)
    return np.concatenate(pixels).reshape(-1, 3, 32, 32), np.concatenate(labels)


def _read_cifar_batch(path: Path):
    fix = (f"replace it with the file from the official cifar-10-python.tar.gz "
           f"(or delete {path.parent} to download it again)")
    if not path.exists():
        raise DataError(f"missing {path}: {fix}")
    try:
        with open(path, "rb") as f:
            entry = _BatchUnpickler(f, encoding="bytes").load()
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        labels = np.asarray(entry[b"labels"], dtype=np.uint8)
    except UnsafePickleError as err:
        raise DataError(f"{path} is not a CIFAR-10 batch ({err}); it was not loaded: {fix}") \
            from err
    except Exception as err:  # a damaged pickle can raise almost anything
        raise DataError(f"{path} is truncated or corrupted ({err!r}): {fix}") from err
    if data.shape != (10000, 3072) or labels.shape != (10000,) or labels.max() > 9:
        raise DataError(f"{path} does not hold 10000 CIFAR-10 images and labels: {fix}")
    return data, labels


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a type that a CIFAR-10 batch does not hold."""


# Dicts, lists, strings and numbers need no lookup. Bytes do in Python 3's protocol 2
# (_codecs.encode(text, "latin1")), and numpy arrays are _reconstruct(ndarray, ...) with a
# dtype, under numpy 1's module name (the official files) or numpy 2's.
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_BATCH_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
                  ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
                  ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                  ("_codecs", "encode"): codecs.encode}


class _BatchUnpickler(pickle.Unpickler):
    """An unpickler that builds only what a CIFAR-10 batch holds; any other class or
    function (os.system, builtins.eval, ...) raises `UnsafePickleError` before it runs."""

    def find_class(self, module: str, name: str):
        try:
            return _BATCH_GLOBALS[module, name]
        except KeyError:
            raise UnsafePickleError(
                f"it asks for {module}.{name}, and a batch holds only dicts, lists, bytes, "
                f"strings, numbers and numpy arrays") from None


def _download_cifar10(root: Path) -> None:
    archive = root / "cifar-10-python.tar.gz"
    try:
        _download(CIFAR10_URL, archive, md5=CIFAR10_MD5)
    except OSError as err:
        raise DataError(
            f"missing {root / CIFAR10_DIR} and could not download {CIFAR10_URL} ({err}); "
            f"extract the official cifar-10-python.tar.gz into {root}"
        ) from err
    with tempfile.TemporaryDirectory(dir=root) as tmp, tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / CIFAR10_DIR, root / CIFAR10_DIR)
    archive.unlink()


# -- digits (ships with scikit-learn) -----------------------------------------

DIGITS_TEST_FRACTION = 0.2


def _load_digits(split: str):
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DataError("the digits dataset ships with scikit-learn: "
                        "pip install 'normlab[digits]'") from err
    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    n_test = int(len(order) * DIGITS_TEST_FRACTION)
    index = order[n_test:] if split == "train" else order[:n_test]
    return bunch.images[index].astype(np.uint8).reshape(-1, 1, 8, 8), bunch.target[index]


# -- downloads ---------------------------------------------------------------

def _download(url: str, dest: Path, md5: str | None = None) -> None:
    """Download `url` to `dest` atomically (and check its md5 when given)."""
    from tqdm import tqdm

    created = [folder for folder in (dest.parent, *dest.parent.parents) if not folder.exists()]
    partial = dest.with_name(dest.name + ".part")
    try:
        digest, received = hashlib.md5(), 0
        with urllib.request.urlopen(url, timeout=30) as response:
            dest.parent.mkdir(parents=True, exist_ok=True)
            total = int(response.headers.get("Content-Length") or 0) or None
            with open(partial, "wb") as out, tqdm(total=total, unit="B", unit_scale=True,
                                                  desc=f"download {dest.name}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        # read(n) returns what came before a dropped connection without raising
        if total is not None and received != total:
            raise OSError(f"{url} stopped after {received} of {total} bytes")
        if md5 is not None and digest.hexdigest() != md5:
            raise OSError(f"{url} arrived corrupted (md5 {digest.hexdigest()}, expected {md5})")
        shutil.move(partial, dest)
    except BaseException:  # an interrupt too: no partial file, no folder made for nothing
        partial.unlink(missing_ok=True)
        for folder in created:  # deepest first; one that holds other files stays
            try:
                folder.rmdir()
            except OSError:
                break
        raise
