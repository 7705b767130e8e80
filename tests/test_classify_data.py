"""Readers on small files written in the datasets' real formats, and their errors on bad input."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from sparsevl.classify import data


def write_cifar_bin(path, labels, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, (len(labels), 3072), dtype=np.uint8)
    path.write_bytes(np.concatenate([np.asarray(labels, np.uint8)[:, None], pixels], 1).tobytes())
    return pixels.reshape(-1, 3, 32, 32)


def write_idx_gz(path, array):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_cifar10_binary_reads_labels_and_planes(tmp_path):
    pixels = write_cifar_bin(tmp_path / "b.bin", [3, 9])
    images, labels = data.read_cifar10_binary(tmp_path / "b.bin")
    assert labels.tolist() == [3, 9]
    assert images.shape == (2, 3, 32, 32) and np.array_equal(images, pixels)


def test_cifar10_binary_truncated_names_file(tmp_path):
    write_cifar_bin(tmp_path / "data_batch_1.bin", [1, 2])
    (tmp_path / "data_batch_1.bin").write_bytes((tmp_path / "data_batch_1.bin").read_bytes()[:-10])
    with pytest.raises(ValueError, match="data_batch_1.bin.*truncated"):
        data.read_cifar10_binary(tmp_path / "data_batch_1.bin")


def test_cifar10_loader_binary_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar_bin(folder / f"data_batch_{i}.bin", [i, 0], seed=i)
    write_cifar_bin(folder / "test_batch.bin", [7], seed=9)
    ds = data.load_dataset("cifar10", tmp_path, img_size=32, in_channels=3)
    assert ds.train.images.shape == (10, 3, 32, 32) and ds.train.labels.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0]
    assert ds.test.labels.tolist() == [7] and ds.class_names[7] == "horse"
    assert 0.0 <= float(ds.train.images.min()) and float(ds.train.images.max()) <= 1.0


def test_cifar10_python_batch_read_with_plain_unpickler(tmp_path):
    pixels = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"batch_label": b"training batch 1 of 5", b"labels": [4, 2], b"data": pixels}, f, protocol=2)
    images, labels = data.read_cifar10_python(tmp_path / "data_batch_1")
    assert labels.tolist() == [4, 2] and np.array_equal(images.reshape(2, 3072), pixels)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_plain_unpickler_refuses_code_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(ValueError, match=r"data_batch_1.*refusing to load (posix|os)\.system"):
        data.read_cifar10_python(tmp_path / "data_batch_1")
    assert not marker.exists()
    assert not (tmp_path / "pwned").exists()


def test_fashion_mnist_idx_gz(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 5), ("t10k", 3)):
        write_idx_gz(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx_gz(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n))
    ds = data.load_dataset("fashion_mnist", tmp_path, img_size=28, in_channels=1)
    assert ds.train.images.shape == (5, 1, 28, 28) and ds.test.labels.tolist() == [0, 1, 2]
    assert ds.class_names[9] == "ankle boot"


def test_idx_truncated_names_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 4, 28, 28)
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(100))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz.*holds 100 data bytes"):
        data.read_idx(path)
    path.write_bytes(path.read_bytes()[:20])  # a cut-off gzip stream
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz"):
        data.read_idx(path)


def _flickr_root(tmp_path, names):
    (tmp_path / "Images").mkdir()
    lines = []
    for i, name in enumerate(names):
        Image.new("RGB", (40 + i, 30), (20 * i, 100, 200)).save(tmp_path / "Images" / name)
        lines += [f"{name}#{j}\ta caption {j} of image {i}" for j in range(5)]
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_flickr8k_images_and_captions(tmp_path):
    root = _flickr_root(tmp_path, ["a.jpg", "b.jpg", "c.jpg"])
    (root / "Flickr_8k.testImages.txt").write_text("b.jpg\n")
    ds = data.load_dataset("flickr8k", root, img_size=16, in_channels=3)
    assert ds.task == "retrieval"
    assert ds.train.images.shape == (2, 3, 16, 16) and ds.test.images.shape == (1, 3, 16, 16)
    assert ds.test.captions == [[f"a caption {j} of image 1" for j in range(5)]]


def test_flickr8k_missing_caption_file_named(tmp_path):
    (tmp_path / "Images").mkdir()
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt"):
        data.load_dataset("flickr8k", tmp_path, img_size=16, in_channels=3)


def test_wrong_image_size_or_channels_names_source(tmp_path):
    with pytest.raises(ValueError, match=r"load_digits: images are 1x8x8 .* expects 3x8x8"):
        data.load_dataset("digits", tmp_path, img_size=8, in_channels=3)
    with pytest.raises(ValueError, match=r"expects 1x32x32"):
        data.load_dataset("digits", tmp_path, img_size=32, in_channels=1)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose from: digits"):
        data.load_dataset("mnist", tmp_path, img_size=8, in_channels=1)


def test_digits_split_is_fixed():
    ds = data.load_dataset("digits", "unused", img_size=8, in_channels=1, max_train_samples=100)
    assert ds.train.images.shape == (100, 1, 8, 8) and ds.test.images.shape == (360, 1, 8, 8)
    assert torch.bincount(ds.test.labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert float(ds.train.images.max()) == 1.0
