"""Our model against oracles it did not compute: transformers' Llava (forward, loss, generate) and a slow
greedy loop of full forward passes, on a model whose greedy tokens change from step to step."""

import pytest
import torch
from tiny import EOS_ID, IMAGE_TOKEN_ID, PAD_ID, liven, make_model, prompt_with_image, random_pixels, right_padded

from sparsevl.model.llava_hf import to_llava_hf
from sparsevl.model.vlm import IGNORE_INDEX

NEW_TOKENS = 8


def lively_model(**overrides):
    """tiny-llama + tiny-clip, livened: its greedy tokens vary from step to step."""
    return liven(make_model("tiny-llama", "tiny-clip", **overrides)[0])


def expanded(row: list[int], num_image_tokens: int) -> list[int]:
    """transformers' Llava wants the `<image>` placeholder already repeated once per visual token."""
    at = row.index(IMAGE_TOKEN_ID)
    return row[:at] + [IMAGE_TOKEN_ID] * num_image_tokens + row[at + 1:]


def greedy_by_full_forward(model, row: list[int], pixels: torch.Tensor) -> list[int]:
    """The obvious reference: one full forward pass per new token (positions 0..n recomputed each time)."""
    tokens: list[int] = []
    for _ in range(NEW_TOKENS):
        ids = torch.tensor([row + tokens])
        token = int(model(ids, torch.ones_like(ids), pixels).logits[0, -1].argmax())
        if token == EOS_ID:
            break
        tokens.append(token)
    return tokens


@pytest.fixture(scope="module")
def lively():
    torch.manual_seed(0)
    rows = [prompt_with_image(8, 1), prompt_with_image(3, 0)]
    return lively_model(), rows, random_pixels(2)


def test_the_lively_model_really_varies_its_greedy_tokens(lively):
    model, rows, pixels = lively
    reference = greedy_by_full_forward(model, rows[0], pixels[:1])
    assert len(reference) == NEW_TOKENS and len(set(reference)) >= 4, reference


@pytest.mark.parametrize("use_cache", [True, False])
def test_generate_equals_greedy_by_full_forward_passes(lively, use_cache):
    model, rows, pixels = lively
    ids, mask = right_padded(rows)
    generated = model.generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID, use_cache=use_cache)
    assert generated == [greedy_by_full_forward(model, row, pixels[i:i + 1]) for i, row in enumerate(rows)]


def test_generate_equals_transformers_llava_generate(lively):
    model, rows, pixels = lively
    hf = to_llava_hf(model)
    ids, mask = right_padded(rows)
    ours = model.generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)
    for i, row in enumerate(rows):
        prompt = torch.tensor([expanded(row, model.num_image_tokens)])
        out = hf.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixels[i:i + 1],
                          max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
        theirs = out[0, prompt.shape[1]:].tolist()
        assert ours[i] == (theirs[: theirs.index(EOS_ID)] if EOS_ID in theirs else theirs)


def test_lm_loss_equals_transformers_llava_loss():
    model = lively_model()
    rows = [prompt_with_image(9, 2), prompt_with_image(6, 0)]
    pixels = random_pixels(2)
    for i, row in enumerate(rows):
        ids = torch.tensor([row])
        labels = ids.clone()
        labels[0, : row.index(IMAGE_TOKEN_ID) + 2] = IGNORE_INDEX  # the prompt part carries no labels
        ours = model(ids, torch.ones_like(ids), pixels[i:i + 1], labels).losses["lm"]
        long_ids = torch.tensor([expanded(row, model.num_image_tokens)])
        at = row.index(IMAGE_TOKEN_ID)
        long_labels = torch.cat([labels[0, :at], torch.full((model.num_image_tokens,), IGNORE_INDEX),
                                 labels[0, at + 1:]])[None]
        theirs = to_llava_hf(model)(input_ids=long_ids, pixel_values=pixels[i:i + 1], labels=long_labels).loss
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_cls_patch_equals_llava_with_the_full_select_strategy():
    model, _ = make_model("tiny-llama", "tiny-clip", mm_vision_select_feature="cls_patch")
    hf = to_llava_hf(model)
    assert hf.config.vision_feature_select_strategy == "full"
    patches = (model.vision_tower.config.image_size // model.vision_tower.config.patch_size) ** 2
    assert model.num_image_tokens == patches + 1  # [CLS] kept
    row, pixels = prompt_with_image(7, 2), random_pixels(1)
    ours = model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), pixels).logits[0]
    theirs = hf(input_ids=torch.tensor([expanded(row, patches + 1)]), pixel_values=pixels).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    plain, _ = make_model("tiny-llama", "tiny-clip")  # same seed, same weights: only the [CLS] token differs
    plain_logits = plain(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), pixels).logits[0]
    assert not torch.allclose(plain_logits[-1], ours[-1], atol=1e-4)
