"""Answer questions about an image with a loaded checkpoint: the model-calling logic behind `sparsevl chat`
and `sparsevl serve` (no UI here, so it is tested without a terminal or a browser).

Besides the answer, each call reports which visual tokens the LLM saw (as patch indices, for the overlay)
and, for MoE models, how many tokens each expert received.
"""

import io
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageDraw, UnidentifiedImageError

from sparsevl.data.conversation import IMAGE_TOKEN, prompt_ids
from sparsevl.model.vlm import SparseVLM
from sparsevl.serve.sampling import SamplingParams
from sparsevl.serve.scheduler import Scheduler

ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF")


class UploadError(ValueError):
    """An uploaded file we refuse; the message says why and is shown to the user."""


def open_upload(source: str | Path | bytes, *, max_bytes: int, max_pixels: int = 4096 * 4096,
                name: str | None = None) -> Image.Image:
    """An uploaded image (a file, or its bytes) as RGB after size, type and pixel-count checks; UploadError
    naming the upload otherwise."""
    name = name or (Path(source).name if not isinstance(source, bytes) else "the image")
    size = len(source) if isinstance(source, bytes) else Path(source).stat().st_size
    if size > max_bytes:
        raise UploadError(f"upload rejected: {name} is {size / 2**20:.1f} MB; the limit is {max_bytes / 2**20:g} MB")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as probe:
            image_format, (width, height) = probe.format, probe.size
    except Image.DecompressionBombError:
        raise UploadError(f"upload rejected: {name} has too many pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise UploadError(f"upload rejected: {name} is not an image (accepted: {', '.join(ACCEPTED_FORMATS)})") from None
    if image_format not in ACCEPTED_FORMATS:
        raise UploadError(f"upload rejected: {name} is a {image_format} image; accepted: {', '.join(ACCEPTED_FORMATS)}")
    if width * height > max_pixels:
        raise UploadError(f"upload rejected: {name} is {width}x{height} pixels; the limit is {max_pixels} pixels")
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise UploadError(f"upload rejected: {name} cannot be decoded (truncated or corrupt?): {error}") from None


@dataclass
class Answer:
    text: str
    token_ids: list[int]  # new tokens, eos excluded
    num_visual_tokens: int  # visual tokens of the image in the LLM's input
    kept_patches: list[int] | None  # patch indices (row-major on patch_grid) the LLM saw; None: not patch-aligned
    expert_load: dict[str, list[int]] | None  # MoE layer name -> tokens routed to each expert; None: dense model


class VisionAssistant:
    """A checkpoint ready to answer: model, tokenizer, image processor, and the batching scheduler that runs
    every generation (`scheduler`, shared with the API server)."""

    def __init__(self, model: SparseVLM, tokenizer, image_processor, *, template: str = "chat", **scheduler_options):
        """`scheduler_options`: the Scheduler's max_batch_size, max_queue, batch_wait_ms."""
        self.model, self.tokenizer, self.image_processor = model.eval(), tokenizer, image_processor
        self.template = template
        self.scheduler = Scheduler(self.model, tokenizer, **scheduler_options).start()
        self._lock = threading.Lock()  # `ask` calls take turns, so each one's expert load is its own

    @classmethod
    def load(cls, model_dir: str | Path, inference_args=None, **scheduler_options) -> "VisionAssistant":
        """Load a checkpoint; `inference_args` (parsed `--token_pruner ...`, `--second_expert_policy` flags) set
        its pruning plan and routing; `scheduler_options` go to the Scheduler."""
        from sparsevl.eval.run import load_for_inference
        from sparsevl.model.inference_flags import apply_inference_flags

        model, tokenizer, image_processor = load_for_inference(model_dir)
        if inference_args is not None:
            apply_inference_flags(inference_args, model)
        return cls(model, tokenizer, image_processor, **scheduler_options)

    @property
    def patch_grid(self) -> tuple[int, int]:
        """(rows, columns) of vision patches."""
        config = self.model.vision_tower.config
        side = config.image_size // config.patch_size
        return side, side

    def ask(self, image: Image.Image, question: str, *, history: list[dict] = (), max_new_tokens: int = 64,
            temperature: float = 0.0, seed: int = 0, on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer `question` about `image` after the earlier `history` turns ({"from", "value"}, no `<image>`)."""
        if not question.strip():
            raise ValueError("the question is empty")
        if max_new_tokens < 1:
            raise ValueError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
        ids = self.prompt(question, history, max_new_tokens)
        pixel_values = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, seed=seed)
        with self._lock:
            before = expert_token_counts(self.model)
            done = self.scheduler.generate(ids, pixel_values, params, on_text=on_text)
            load = expert_load_since(before, expert_token_counts(self.model))
        if done.finish_reason == "error":
            raise RuntimeError(done.error)
        return Answer(text=done.text, token_ids=done.token_ids, num_visual_tokens=done.visual_tokens,
                      kept_patches=kept_patches(self.model, done.visual_positions, done.kept_positions),
                      expert_load=load)

    def prompt(self, question: str, history: list[dict], max_new_tokens: int) -> list[int]:
        """Prompt ids with the image in the first question; the oldest exchanges are dropped until the
        prompt, its visual tokens and the answer fit the LLM's context."""
        context = getattr(self.model.llm.config, "max_position_embeddings", None) or 10**9
        history = list(history)
        while True:
            turns = [dict(turn) for turn in history]
            if turns:
                turns[0]["value"] = f"{IMAGE_TOKEN}\n{turns[0]['value']}"
            text = question if turns else f"{IMAGE_TOKEN}\n{question}"
            ids = prompt_ids(text, self.tokenizer, template=self.template, history=turns)
            if len(ids) - 1 + self.model.num_image_tokens + max_new_tokens <= context:
                return ids
            if not history:
                raise ValueError(f"the question is too long for the model's context of {context} tokens "
                                 f"(with {self.model.num_image_tokens} visual and {max_new_tokens} new tokens)")
            history = history[2:]


def kept_patches(model: SparseVLM, visual_positions: list[int], kept_positions: list[int] | None = None
                 ) -> list[int] | None:
    """Patch indices behind the image's visual tokens (at prompt `visual_positions`) that the LLM's last layer
    saw: all patches without pruning, the survivors' patches when `kept_positions` (prompt positions kept
    inside the LLM) is given; None when tokens do not map to patches (e.g. a Q-Former's queries, or pruning
    before the LLM)."""
    tower = model.vision_tower
    num_cls = len(visual_positions) - tower.num_patches
    if len(visual_positions) != tower.num_output_tokens or num_cls not in (0, 1):
        return None
    if kept_positions is None:
        return list(range(tower.num_patches))
    patch_at = {position: i - num_cls for i, position in enumerate(visual_positions) if i >= num_cls}
    return sorted(patch_at[p] for p in kept_positions if p in patch_at)


def moe_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules that count the tokens routed to each expert (an `expert_token_counts` tensor), by name."""
    return {name: module for name, module in model.named_modules()
            if isinstance(getattr(module, "expert_token_counts", None), torch.Tensor)}


def expert_token_counts(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: module.expert_token_counts.detach().clone() for name, module in moe_layers(model).items()}


def expert_load_since(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> dict[str, list[int]] | None:
    """Tokens each expert received between two snapshots, per layer; None for a dense model."""
    if not after:
        return None
    return {name: (after[name] - before[name]).tolist() for name in after}


def model_view(image: Image.Image, image_processor) -> Image.Image:
    """The part of `image` the model sees: the centre square when the processor centre-crops, else all of it."""
    if not getattr(image_processor, "do_center_crop", False):
        return image
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side))


def kept_token_overlay(image: Image.Image, kept: list[int] | None, grid: tuple[int, int], *,
                       size: int = 256) -> Image.Image:
    """`image` resized to size x size with the patch grid drawn; patches not in `kept` are darkened.
    kept None (tokens not patch-aligned) draws the grid only."""
    rows, cols = grid
    view = image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    shade = Image.new("RGBA", view.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(shade)
    kept_set = set(range(rows * cols)) if kept is None else set(kept)
    cell_w, cell_h = size / cols, size / rows
    for index in range(rows * cols):
        row, col = divmod(index, cols)
        box = (round(col * cell_w), round(row * cell_h), round((col + 1) * cell_w) - 1, round((row + 1) * cell_h) - 1)
        if index not in kept_set:
            draw.rectangle(box, fill=(0, 0, 0, 170))
        draw.rectangle(box, outline=(255, 255, 255, 110))
    return Image.alpha_composite(view.convert("RGBA"), shade).convert("RGB")


def describe_kept(answer: Answer, grid: tuple[int, int]) -> str:
    rows, cols = grid
    if answer.kept_patches is None:
        return f"{answer.num_visual_tokens} visual tokens (not one per patch, so no patch overlay)"
    return (f"{len(answer.kept_patches)} of {rows * cols} visual tokens kept "
            f"({rows}x{cols} patch grid; darkened patches were dropped)")


def describe_expert_load(load: dict[str, list[int]] | None) -> str:
    """A Markdown table of tokens per expert and each expert's share, or 'dense model'."""
    if load is None:
        return "dense model (no MoE layers)"
    width = max(len(counts) for counts in load.values())
    lines = ["| layer | " + " | ".join(f"expert {i}" for i in range(width)) + " |",
             "|---" * (width + 1) + "|"]
    for name, counts in load.items():
        total = max(sum(counts), 1)
        lines.append(f"| {name} | " + " | ".join(f"{c} ({c / total:.0%})" for c in counts) + " |")
    return "\n".join(lines)
