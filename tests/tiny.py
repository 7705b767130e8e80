"""Small builders shared by tests: tiny real architectures with random (seeded) weights."""

import torch

from sparsevl.config import ModelArguments
from sparsevl.model.build import build_image_processor, build_model, save_checkpoint

VOCAB_SIZE = 64
IMAGE_TOKEN_ID = 63
PAD_ID = 0
EOS_ID = 1


def make_model(llm: str = "tiny-llama", vision: str = "tiny-clip", projector: str = "mlp2x_gelu",
               seed: int = 0, **overrides):
    torch.manual_seed(seed)
    args = ModelArguments(model_name_or_path=llm, vision_tower=vision, mm_projector_type=projector, **overrides)
    return build_model(args, vocab_size=VOCAB_SIZE, image_token_id=IMAGE_TOKEN_ID).eval(), args


def liven(model):
    """Scale the LLM's matrices 4x in place: greedy decoding then emits varied tokens that depend on the image
    and the positions (a plain random tiny model repeats one token, which hides decoding bugs)."""
    with torch.no_grad():
        for parameter in model.llm.parameters():
            if parameter.dim() == 2:
                parameter.mul_(4.0)
    return model


def random_pixels(num_images: int, size: int = 64, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_images, 3, size, size, generator=generator)


def prompt_with_image(length: int, image_at: int = 1, seed: int = 2) -> list[int]:
    generator = torch.Generator().manual_seed(seed + length)
    ids = torch.randint(2, IMAGE_TOKEN_ID, (length,), generator=generator).tolist()
    ids[image_at] = IMAGE_TOKEN_ID
    return ids


def right_padded(rows: list[list[int]], pad: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    longest = max(map(len, rows))
    ids = torch.full((len(rows), longest), pad)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    return ids, mask


def save_tiny_checkpoint(directory, tokenizer, seed: int = 0, **overrides):
    """A random tiny model sized for `tokenizer` (which gains `<image>`), saved as a sparsevl checkpoint."""
    from sparsevl.data.tokenizer import add_image_token

    torch.manual_seed(seed)
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    image_token_id = add_image_token(tokenizer)
    args = ModelArguments(**{"model_name_or_path": "tiny-llama", "vision_tower": "tiny-clip", **overrides})
    model = build_model(args, vocab_size=len(tokenizer), image_token_id=image_token_id)
    image_processor = build_image_processor(args.vision_tower, model.vision_tower.config)
    return save_checkpoint(model, directory, model_args=args, tokenizer=tokenizer, image_processor=image_processor)


def train_flags(shapes_dir, shapes_tokenizer, out, **extra) -> list[str]:
    """`sparsevl train` flags for a tiny run on the shapes fixture; keyword arguments add or override flags."""
    values = {"model_name_or_path": "tiny-qwen3", "vision_tower": "tiny-clip", "tokenizer_name_or_path":
              shapes_tokenizer.name_or_path, "data_path": shapes_dir / "finetune.json", "output_dir": out,
              "per_device_train_batch_size": 16, "learning_rate": 2e-3, "logging_steps": 5, "save_steps": 20,
              "report_to": "tensorboard", "seed": 0, **extra}
    return [token for key, value in values.items() for token in (f"--{key}", str(value))]


def save_lively_checkpoint(directory, tokenizer, *, scale: float = 8.0, seed: int = 0):
    """A random tiny-llama + tiny-clip checkpoint whose LLM matrices are scaled up by `scale`: at the default
    initialisation a random LLM repeats one token whatever the prompt, which would hide decoding bugs; scaled,
    its greedy answers vary with the prompt, the image and every earlier token."""
    from sparsevl.config import ModelArguments

    torch.manual_seed(seed)
    args = ModelArguments(model_name_or_path="tiny-llama", vision_tower="tiny-clip")
    model = build_model(args, vocab_size=len(tokenizer), image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    with torch.no_grad():
        for parameter in list(model.llm.parameters()) + list(model.projector.parameters()):
            if parameter.dim() == 2:
                parameter.mul_(scale)
    processor = build_image_processor(args.vision_tower, model.vision_tower.config)
    return save_checkpoint(model, directory, model_args=args, tokenizer=tokenizer, image_processor=processor)
