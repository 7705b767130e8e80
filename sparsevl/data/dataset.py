"""LLaVA JSON data set (records with `image` and `conversations`) and the padding collator."""

import json
import logging
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from transformers import LlavaImageProcessorPil

from sparsevl.data.conversation import IGNORE_INDEX, BadSampleError, check_turns, tokenize_conversation

logger = logging.getLogger(__name__)


def read_records(data_path: str | Path) -> list:
    """The JSON list of records; a clear error naming the file if it is not one."""
    path = Path(data_path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"data file {path} does not exist") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"data file {path} is not UTF-8 text: {error}") from None
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"data file {path} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"data file {path} must hold a JSON list of records, found {type(records).__name__}")
    return records


# Largest image decoded, in pixels (PIL's own default limit); larger ones are refused before decoding.
MAX_IMAGE_PIXELS = 89_478_485


def load_image(path: Path) -> Image.Image:
    """Open an image as RGB (grey, RGBA, CMYK, palette converted); BadSampleError if unreadable or too big."""
    try:
        with warnings.catch_warnings():  # PIL warns above MAX_IMAGE_PIXELS; we refuse such images below instead
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(path)  # reads the header only
        with image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise BadSampleError(f"image {path} is too large: {image.width}x{image.height} pixels is more "
                                     f"than {MAX_IMAGE_PIXELS} (a decompression bomb?)")
            image.load()
            return image.convert("RGB")
    except FileNotFoundError:
        raise BadSampleError(f"image {path} does not exist") from None
    except Image.DecompressionBombError as error:
        raise BadSampleError(f"image {path} is too large: {error}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise BadSampleError(f"image {path} cannot be read: {error}") from None


IMAGE_ASPECT_RATIOS = ("square", "pad")  # --image_aspect_ratio


def with_aspect_ratio(image_processor, aspect_ratio: str):
    """The image processor for --image_aspect_ratio: `pad` is transformers' LlavaImageProcessorPil with do_pad
    (LLaVA's rule: expand to a square filled with int(255 x image_mean), then resize / crop / normalise), built with
    this processor's sizes and statistics; saved with the checkpoint, so evaluation and serving pad alike.
    `square` turns a padding processor's do_pad off."""
    if aspect_ratio not in IMAGE_ASPECT_RATIOS:
        raise ValueError(f"--image_aspect_ratio {aspect_ratio!r} is unknown; choose from {IMAGE_ASPECT_RATIOS}")
    if aspect_ratio == "square":
        if getattr(image_processor, "do_pad", False):
            image_processor.do_pad = False
        return image_processor
    crop = getattr(image_processor, "do_center_crop", False)
    return LlavaImageProcessorPil(
        do_pad=True, size=dict(image_processor.size), do_center_crop=crop,
        crop_size=dict(image_processor.crop_size) if crop else None, resample=image_processor.resample,
        image_mean=list(image_processor.image_mean), image_std=list(image_processor.image_std),
        rescale_factor=image_processor.rescale_factor)


class ImageCache:
    """Least-recently-used preprocessed images, at most `max_mb` MiB of tensors (0: keep none).

    Each DataLoader worker holds its own cache."""

    def __init__(self, max_mb: float):
        if max_mb < 0:
            raise ValueError(f"--image_cache_mb must be >= 0, got {max_mb}")
        self.max_bytes = int(max_mb * 2**20)
        self.bytes = 0
        self._entries: OrderedDict[Path, torch.Tensor] = OrderedDict()

    def get(self, path: Path) -> torch.Tensor | None:
        pixels = self._entries.get(path)
        if pixels is not None:
            self._entries.move_to_end(path)
        return pixels

    def put(self, path: Path, pixels: torch.Tensor) -> None:
        size = pixels.numel() * pixels.element_size()
        if size > self.max_bytes or path in self._entries:
            return
        self._entries[path] = pixels
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()


class RecordStore:
    """Records kept as one bytes buffer of compact JSON plus offsets: a few hundred bytes per record, and no
    Python objects whose reference counts would copy the pages into every forked DataLoader worker."""

    def __init__(self, records: list):
        blobs = [json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode() for record in records]
        self._offsets = np.cumsum([0] + [len(blob) for blob in blobs], dtype=np.int64)
        self._buffer = b"".join(blobs)

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> dict:
        return json.loads(self._buffer[self._offsets[index]:self._offsets[index + 1]])


class LlavaJsonDataset(Dataset):
    """LLaVA JSON records, tokenized and their images decoded when an item is read (so 100,000s of records
    start at once and decoding runs in DataLoader workers).

    An up-front pass checks every record's structure, turns, `<image>` count and image files, and measures its
    modality length (LLaVA's word count, negative for text-only records). With `skip_bad_samples` it also
    tokenizes and decodes every record once (keeping nothing), so every bad record is skipped before training.
    """

    def __init__(self, data_path: str | Path, *, tokenizer, image_processor, image_folder: str | Path | None = None,
                 template: str = "chat", max_length: int = 512, num_image_tokens: int,
                 skip_bad_samples: bool = False, image_cache_mb: float = 0):
        self.data_path = Path(data_path)
        self.image_folder = Path(image_folder) if image_folder else self.data_path.parent
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.max_length, self.num_image_tokens = template, max_length, num_image_tokens
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[tuple[str, str]] = []  # (record id, reason)
        self.cache = ImageCache(image_cache_mb)
        kept, lengths, self._existing = [], [], set()
        for index, record in enumerate(read_records(self.data_path)):
            try:
                lengths.append(self._check(record))
                kept.append(record)
            except BadSampleError as error:
                self._reject(_record_name(record, index), error)
        if self.skipped:
            logger.warning("%s: skipped %d bad record(s): %s", self.data_path, len(self.skipped),
                           "; ".join(f"{rid}: {why}" for rid, why in self.skipped[:20]))
        if not kept:
            raise ValueError(f"data file {self.data_path} has no usable records")
        self.records = RecordStore(kept)
        self.modality_lengths = np.asarray(lengths, dtype=np.int32)
        del self._existing

    def _reject(self, name: str, error: BadSampleError) -> None:
        if not self.skip_bad_samples:
            raise BadSampleError(f"{self.data_path} record {name}: {error} "
                                 "(use --skip_bad_samples True to skip such records)") from None
        self.skipped.append((name, str(error)))

    def _check(self, record) -> int:
        """Validate a record; return its modality length (words of all turns, negative without an image)."""
        if not isinstance(record, dict):
            raise BadSampleError(f"is a {type(record).__name__}, not an object")
        if "conversations" not in record:
            raise BadSampleError("has no `conversations`")
        names = _image_names(record)
        for name in names:  # records share images: each file is looked up once
            if name not in self._existing:
                if not os.path.isfile(os.path.join(self.image_folder, name)):
                    raise BadSampleError(f"image {self.image_folder / name} does not exist")
                self._existing.add(name)
        check_turns(record["conversations"], num_images=len(names))
        if self.skip_bad_samples:  # find what only tokenizing and decoding reveal, while it can still be skipped
            self._tokenize(record, len(names))
            for name in names:
                self.pixels(self.image_folder / name)
        words = sum(len(turn["value"].split()) for turn in record["conversations"])
        return words if names else -words

    def _tokenize(self, record: dict, num_images: int):
        return tokenize_conversation(record["conversations"], self.tokenizer, template=self.template,
                                     max_length=self.max_length, num_image_tokens=self.num_image_tokens,
                                     num_images=num_images)

    def __len__(self) -> int:
        return len(self.records)

    def record_id(self, index: int) -> str:
        """The `id` of the record behind sample `index` (for messages about a batch)."""
        return str(self.records[index].get("id", ""))

    def pixels(self, path: Path) -> torch.Tensor:
        """Preprocessed image (channels, height, width), from the LRU cache when it holds it."""
        pixels = self.cache.get(path)
        if pixels is None:
            pixels = self.image_processor(images=load_image(path), return_tensors="pt")["pixel_values"][0]
            self.cache.put(path, pixels)
        return pixels

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        try:
            paths = [self.image_folder / name for name in _image_names(record)]
            tokenized = self._tokenize(record, len(paths))
            pixel_values = [self.pixels(path) for path in paths]
        except BadSampleError as error:
            raise BadSampleError(f"{self.data_path} record {_record_name(record, index)}: {error}") from None
        return {"input_ids": tokenized.input_ids, "labels": tokenized.labels, "pixel_values": pixel_values,
                "sample_index": index}


def _image_names(record: dict) -> list[str]:
    """The record's image paths (relative to the image folder), checked to be strings."""
    images = record.get("image") or []
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
        raise BadSampleError("`image` must be a path or a list of paths")
    return images


def _record_name(record, index: int) -> str:
    record_id = record.get("id") if isinstance(record, dict) else None
    return f"#{index}" + (f" (id {record_id!r})" if record_id is not None else "")


@dataclass
class PaddingCollator:
    """Pads to the longest sample in the batch (right side); stacks all images of the batch in order."""

    pad_token_id: int

    def __call__(self, samples: list[dict]) -> dict:
        longest = max(len(s["input_ids"]) for s in samples)
        input_ids = torch.full((len(samples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), longest), dtype=torch.long)
        for row, sample in enumerate(samples):
            length = len(sample["input_ids"])
            input_ids[row, :length] = torch.tensor(sample["input_ids"])
            labels[row, :length] = torch.tensor(sample["labels"])
            attention_mask[row, :length] = 1
        images = [pixels for s in samples for pixels in s["pixel_values"]]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "pixel_values": torch.stack(images) if images else None,
                "sample_index": torch.tensor([s["sample_index"] for s in samples])}
