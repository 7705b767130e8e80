"""LLaVA JSON data set (records with `image` and `conversations`) and the padding collator."""

import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from sparsevl.data.conversation import IGNORE_INDEX, BadSampleError, tokenize_conversation

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


@dataclass
class Sample:
    record_id: str
    input_ids: list[int]
    labels: list[int]
    image_paths: list[Path]


class LlavaJsonDataset(Dataset):
    """Tokenizes every record up front (so bad records are found before training starts)."""

    def __init__(self, data_path: str | Path, *, tokenizer, image_processor, image_folder: str | Path | None = None,
                 template: str = "chat", max_length: int = 512, num_image_tokens: int,
                 skip_bad_samples: bool = False, cache_images: bool = True):
        self.data_path = Path(data_path)
        self.image_folder = Path(image_folder) if image_folder else self.data_path.parent
        self.image_processor = image_processor
        self.skip_bad_samples = skip_bad_samples
        self.skipped: list[tuple[str, str]] = []  # (record id, reason)
        self._pixel_cache: dict[Path, torch.Tensor] | None = {} if cache_images else None
        self.samples = []
        for index, record in enumerate(read_records(self.data_path)):
            try:
                self.samples.append(self._parse(record, tokenizer, template, max_length, num_image_tokens))
            except BadSampleError as error:
                self._reject(_record_name(record, index), error)
        if self.skipped:
            logger.warning("%s: skipped %d bad record(s): %s", self.data_path, len(self.skipped),
                           "; ".join(f"{rid}: {why}" for rid, why in self.skipped[:20]))
        if not self.samples:
            raise ValueError(f"data file {self.data_path} has no usable records")

    def _reject(self, name: str, error: BadSampleError) -> None:
        if not self.skip_bad_samples:
            raise BadSampleError(f"{self.data_path} record {name}: {error} "
                                 "(use --skip_bad_samples True to skip such records)") from None
        self.skipped.append((name, str(error)))

    def _parse(self, record, tokenizer, template, max_length, num_image_tokens) -> Sample:
        if not isinstance(record, dict):
            raise BadSampleError(f"is a {type(record).__name__}, not an object")
        if "conversations" not in record:
            raise BadSampleError("has no `conversations`")
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise BadSampleError("`image` must be a path or a list of paths")
        paths = [self.image_folder / p for p in images]
        for path in paths:
            if not path.is_file():
                raise BadSampleError(f"image {path} does not exist")
            if self.skip_bad_samples:
                self.pixels(path)  # find unreadable images now, while they can still be skipped
        tokenized = tokenize_conversation(record["conversations"], tokenizer, template=template,
                                          max_length=max_length, num_image_tokens=num_image_tokens,
                                          num_images=len(paths))
        return Sample(str(record.get("id", "")), tokenized.input_ids, tokenized.labels, paths)

    def __len__(self) -> int:
        return len(self.samples)

    def record_id(self, index: int) -> str:
        """The `id` of the record behind sample `index` (for messages about a batch)."""
        return self.samples[index].record_id

    def pixels(self, path: Path) -> torch.Tensor:
        """Preprocessed image (channels, height, width), cached in memory when enabled."""
        if self._pixel_cache is not None and path in self._pixel_cache:
            return self._pixel_cache[path]
        pixels = self.image_processor(images=load_image(path), return_tensors="pt")["pixel_values"][0]
        if self._pixel_cache is not None:
            self._pixel_cache[path] = pixels
        return pixels

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            pixel_values = [self.pixels(path) for path in sample.image_paths]
        except BadSampleError as error:
            raise BadSampleError(f"{self.data_path} record {sample.record_id}: {error}") from None
        return {"input_ids": sample.input_ids, "labels": sample.labels, "pixel_values": pixel_values,
                "sample_index": index}


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
