"""The LLaVA forward pass, padding, generation and checkpoints, against transformers' own Llava."""

import pytest
import torch
from tiny import EOS_ID, IMAGE_TOKEN_ID, make_model, prompt_with_image, random_pixels, right_padded

from sparsevl.model.build import load_checkpoint, save_checkpoint
from sparsevl.model.llava_hf import to_llava_hf
from sparsevl.model.vlm import IGNORE_INDEX


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_logits_equal_transformers_llava(select_layer):
    model, _ = make_model("tiny-llama", "tiny-clip", "mlp2x_gelu", mm_vision_select_layer=select_layer)
    hf = to_llava_hf(model)
    rows = [prompt_with_image(9, image_at=2), prompt_with_image(5, image_at=0)]
    ids, mask = right_padded(rows)
    pixels = random_pixels(2)
    ours = model(ids, mask, pixels).logits
    n = model.num_image_tokens
    for i, row in enumerate(rows):  # transformers wants the placeholder already repeated n times
        at = row.index(IMAGE_TOKEN_ID)
        expanded = torch.tensor([row[:at] + [IMAGE_TOKEN_ID] * n + row[at + 1:]])
        theirs = hf(input_ids=expanded, pixel_values=pixels[i:i + 1]).logits[0]
        torch.testing.assert_close(ours[i, : len(theirs)], theirs, atol=1e-5, rtol=1e-5)


def test_unequal_batch_equals_single_samples_and_pads_are_not_attended():
    model, _ = make_model("tiny-qwen3", "tiny-siglip")
    rows = [prompt_with_image(12, 1), prompt_with_image(4, 3), prompt_with_image(7, 0)]
    ids, mask = right_padded(rows)
    pixels = random_pixels(3)
    batch_logits = model(ids, mask, pixels).logits
    ids_other_pad = torch.where(mask.bool(), ids, torch.full_like(ids, 17))  # pad id must not matter
    torch.testing.assert_close(model(ids_other_pad, mask, pixels).logits, batch_logits)
    for i, row in enumerate(rows):
        single = model(torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), pixels[i:i + 1]).logits[0]
        torch.testing.assert_close(batch_logits[i, : len(single)], single, atol=1e-5, rtol=1e-5)


def test_image_tokens_and_padding_carry_no_labels():
    model, _ = make_model()
    rows = [prompt_with_image(6, 1), prompt_with_image(3, 0)]
    ids, mask = right_padded(rows)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, IGNORE_INDEX))
    out = model(ids, mask, random_pixels(2), labels)
    merged = out.inputs
    assert (merged.labels[merged.image_mask] == IGNORE_INDEX).all()
    assert (merged.labels[merged.attention_mask == 0] == IGNORE_INDEX).all()
    assert merged.image_mask.sum() == 2 * model.num_image_tokens
    # the loss, by hand: -log p(next token) averaged over the text positions whose next token is labelled
    log_probs = out.logits.log_softmax(-1)
    terms = [-log_probs[b, t, merged.labels[b, t + 1]] for b in range(2) for t in range(merged.labels.shape[1] - 1)
             if merged.labels[b, t + 1] != IGNORE_INDEX]
    assert len(terms) == 4 + 2  # text tokens but the placeholder, except a first token (row 0: 5 - 1, row 1: 2)
    torch.testing.assert_close(out.losses["lm"], torch.stack(terms).mean())


def test_placeholder_and_image_count_mismatch_is_a_clear_error():
    model, _ = make_model()
    ids, mask = right_padded([prompt_with_image(6, 1)])
    with pytest.raises(ValueError, match="2 images but 1"):
        model(ids, mask, random_pixels(2))
    with pytest.raises(ValueError, match="more <image> placeholders"):
        model(ids, mask, None)


def test_generation_with_and_without_cache_gives_the_same_tokens():
    model, _ = make_model("tiny-qwen3")
    ids, mask = right_padded([prompt_with_image(8, 1), prompt_with_image(3, 0)])
    kwargs = dict(max_new_tokens=6, eos_token_id=EOS_ID)
    cached = model.generate(ids, mask, random_pixels(2), use_cache=True, **kwargs)
    uncached = model.generate(ids, mask, random_pixels(2), use_cache=False, **kwargs)
    assert cached == uncached
    assert all(len(tokens) == 6 for tokens in cached)  # random weights: eos is unlikely; lengths are full


def test_save_load_round_trip_gives_identical_logits(tmp_path):
    model, args = make_model("tiny-qwen3", "tiny-clip", "linear")
    ids, mask = right_padded([prompt_with_image(5, 2)])
    pixels = random_pixels(1)
    save_checkpoint(model, tmp_path, model_args=args)
    loaded, loaded_args = load_checkpoint(tmp_path)
    assert loaded_args.mm_projector_type == "linear"
    torch.testing.assert_close(loaded.eval()(ids, mask, pixels).logits, model(ids, mask, pixels).logits,
                               atol=0, rtol=0)


def test_cache_kwarg_follows_the_callee_signature():
    from sparsevl.model.cache_kwarg import cache_kwarg

    def new_style(x, cache=None):
        return x

    def old_style(x, past_key_values=None):
        return x

    class OldModule(torch.nn.Module):
        def forward(self, x, past_key_values=None):
            return x

    marker = object()
    assert cache_kwarg(new_style, marker) == {"cache": marker}
    assert cache_kwarg(old_style, marker) == {"past_key_values": marker}
    assert cache_kwarg(OldModule(), marker) == {"past_key_values": marker}
