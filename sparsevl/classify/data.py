"""Readers for the classifier's datasets in their original file formats, and the dataset registry.

Every reader names the file it was reading when the file is missing, truncated or malformed.
"""

import gzip
import pickle
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

DIGIT_CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FASHION_MNIST_CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot"]


@dataclass
class ImageSplit:
    images: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    labels: torch.Tensor  # (N,) int64: class index, or the image's own index for captions
    source: str  # the file or folder read, named in errors
    captions: list[list[str]] | None = None  # per image, for image-caption matching


@dataclass
class Dataset:
    train: ImageSplit
    test: ImageSplit
    class_names: list[str]  # empty for image-caption matching
    descriptions: list[str]  # one short text per class: the text stream of the classifier

    @property
    def task(self) -> str:
        return "retrieval" if self.train.captions is not None else "classify"


def _split(images: np.ndarray, labels, source: str, captions=None) -> ImageSplit:
    """uint8 (N, C, H, W) -> float split in [0, 1]."""
    return ImageSplit(torch.from_numpy(images.astype(np.float32) / 255.0), torch.as_tensor(labels, dtype=torch.long), source, captions)


# ---- scikit-learn digits -------------------------------------------------------------------


def load_digits_data(root: Path, img_size: int) -> Dataset:
    """scikit-learn's 8x8 digits (ships offline); stratified 80/20 split with a fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (digits.images[:, None] * (255.0 / 16.0)).round().astype(np.uint8)  # (1797, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(images, digits.target, test_size=0.2, stratify=digits.target, random_state=0)
    source = "sklearn.datasets.load_digits"
    return Dataset(_split(x_train, y_train, source), _split(x_test, y_test, source), DIGIT_CLASSES,
                   [f"a handwritten digit {name}" for name in DIGIT_CLASSES])


# ---- CIFAR-10 ------------------------------------------------------------------------------

CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32


def read_cifar10_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One `data_batch_*.bin`: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    raw = Path(path).read_bytes()
    if not raw or len(raw) % CIFAR_RECORD_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes is not a whole number of {CIFAR_RECORD_BYTES}-byte CIFAR-10 "
                         "records; the file is truncated or not CIFAR-10 binary")
    records = np.frombuffer(raw, np.uint8).reshape(-1, CIFAR_RECORD_BYTES)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise ValueError(f"{path}: label {labels.max()} out of range 0-9; not a CIFAR-10 binary file")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


class PlainUnpickler(pickle.Unpickler):
    """Unpickles plain containers, bytes, numbers and numpy arrays of them; refuses every other global.

    The CIFAR-10 python files store `data` as a numpy array, so numpy's array reconstruction is
    allowed beyond pickle's own opcodes, and `_codecs.encode`, which protocol-2 pickles written by
    Python 3 use for bytes. Object arrays can only hold what this allows.
    """

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")
        return super().find_class(module, name)


def read_cifar10_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python-version batch (a pickled dict with b'data' (N, 3072) and b'labels'), read safely."""
    try:
        with open(path, "rb") as f:
            batch = PlainUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{path}: not a readable CIFAR-10 python batch: {err}") from err
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path}: expected a dict with b'data' and b'labels'")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: b'data' must be uint8 (N, 3072) with N labels, got {data.dtype} {data.shape} and {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root: Path, img_size: int) -> Dataset:
    """`cifar-10-batches-bin/` (binary version) or else `cifar-10-batches-py/` (python version)."""
    if (root / "cifar-10-batches-bin").is_dir():
        folder, reader, names = root / "cifar-10-batches-bin", read_cifar10_binary, ("data_batch_{}.bin", "test_batch.bin")
    elif (root / "cifar-10-batches-py").is_dir():
        folder, reader, names = root / "cifar-10-batches-py", read_cifar10_python, ("data_batch_{}", "test_batch")
    else:
        raise FileNotFoundError(f"{root}: no cifar-10-batches-bin/ or cifar-10-batches-py/ folder "
                                "(run `python -m sparsevl.classify download --dataset cifar10`)")
    train = [reader(folder / names[0].format(i)) for i in range(1, 6)]
    test_images, test_labels = reader(folder / names[1])
    descriptions = [f"a photo of a {name}" for name in CIFAR10_CLASSES]
    return Dataset(_split(np.concatenate([t[0] for t in train]), np.concatenate([t[1] for t in train]), str(folder)),
                   _split(test_images, test_labels, str(folder / names[1])), CIFAR10_CLASSES, descriptions)


# ---- Fashion-MNIST (IDX) -------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzipped or not) of unsigned bytes: magic 0x0000 08 <ndim>, big-endian int32 dims, data."""
    try:
        with (gzip.open if str(path).endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError) as err:
        raise ValueError(f"{path}: cannot read (truncated or not gzip): {err}") from err
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise ValueError(f"{path}: header says shape {shape} ({expected} bytes) but the file holds {len(raw) - header} data bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(root: Path, img_size: int) -> Dataset:
    """The four original `*-idx?-ubyte.gz` files under `root`."""
    splits = []
    for prefix in ("train", "t10k"):
        images_path, labels_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
        images, labels = read_idx(images_path), read_idx(labels_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{images_path} / {labels_path}: expected (N, H, W) images and N labels, "
                             f"got {images.shape} and {labels.shape}")
        splits.append(_split(images[:, None], labels.astype(np.int64), str(images_path)))
    descriptions = [f"a photo of a {name}" for name in FASHION_MNIST_CLASSES]
    return Dataset(splits[0], splits[1], FASHION_MNIST_CLASSES, descriptions)


# ---- Flickr8k ------------------------------------------------------------------------------

FLICKR_IMAGE_DIRS = ("Images", "Flicker8k_Dataset", "Flickr8k_Dataset")


def read_flickr8k_captions(path: Path) -> dict[str, list[str]]:
    """`Flickr8k.token.txt`: lines `<image>.jpg#<n>\\t<caption>` -> {image: [captions]}."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"Flickr8k caption file not found: {path}")
    captions: dict[str, list[str]] = {}
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        key, sep, caption = line.partition("\t")
        if not sep or "#" not in key:
            raise ValueError(f"{path}:{number}: expected '<image>#<n><TAB><caption>', got {line[:60]!r}")
        captions.setdefault(key.rsplit("#", 1)[0], []).append(caption.strip())
    return captions


def _read_images(folder: Path, names: list[str], img_size: int) -> np.ndarray:
    images = np.empty((len(names), 3, img_size, img_size), np.uint8)
    for i, name in enumerate(names):
        with Image.open(folder / name) as image:
            resized = image.convert("RGB").resize((img_size, img_size), Image.BICUBIC)
        images[i] = np.asarray(resized).transpose(2, 0, 1)
    return images


def load_flickr8k(root: Path, img_size: int, num_test_images: int = 1000) -> Dataset:
    """`Images/` (or `Flicker8k_Dataset/`) + `Flickr8k.token.txt`; the official split files when present."""
    captions = read_flickr8k_captions(root / "Flickr8k.token.txt")
    folder = next((root / d for d in FLICKR_IMAGE_DIRS if (root / d).is_dir()), None)
    if folder is None:
        raise FileNotFoundError(f"{root}: no image folder ({' or '.join(FLICKR_IMAGE_DIRS)})")
    missing = [name for name in captions if not (folder / name).is_file()]
    if missing:
        warnings.warn(f"{folder}: {len(missing)} captioned images are missing (e.g. {missing[0]}); skipping them")
    names = sorted(set(captions) - set(missing))
    if not names:
        raise FileNotFoundError(f"{folder}: none of the images named in {root / 'Flickr8k.token.txt'} exist")
    test_file = root / "Flickr_8k.testImages.txt"
    test_names = set(test_file.read_text().split()) if test_file.is_file() else set(names[-num_test_images:])
    splits = []
    for chosen in ([n for n in names if n not in test_names], [n for n in names if n in test_names]):
        splits.append(_split(_read_images(folder, chosen, img_size), np.arange(len(chosen)), str(folder),
                             [captions[n] for n in chosen]))
    return Dataset(splits[0], splits[1], [], [])


# ---- registry ------------------------------------------------------------------------------

LOADERS = {"digits": load_digits_data, "cifar10": load_cifar10, "fashion_mnist": load_fashion_mnist, "flickr8k": load_flickr8k}


def check_image_shape(split: ImageSplit, img_size: int, in_channels: int) -> None:
    """Refuse images whose size or channel count differ from the model config."""
    channels, height, width = split.images.shape[1:]
    if (channels, height, width) != (in_channels, img_size, img_size):
        raise ValueError(f"{split.source}: images are {channels}x{height}x{width} (channels x height x width) but the "
                         f"config expects {in_channels}x{img_size}x{img_size}; set --in_channels/--img_size to match")


def load_dataset(name: str, root: str, *, img_size: int, in_channels: int, max_train_samples: int | None = None) -> Dataset:
    """Read a dataset by name and check its images against the model config."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose from: {', '.join(LOADERS)}")
    data = LOADERS[name](Path(root), img_size)
    for split in (data.train, data.test):
        check_image_shape(split, img_size, in_channels)
    if max_train_samples is not None:
        train = data.train
        captions = train.captions[:max_train_samples] if train.captions is not None else None
        data.train = ImageSplit(train.images[:max_train_samples], train.labels[:max_train_samples], train.source, captions)
    return data
