"""SparseVLM's smaller promises, each against a value worked out independently: stopping at eos per row,
streamed steps, summed module losses, the empty-label loss, gradient checkpointing and the exact errors."""

import pytest
import torch
from tiny import EOS_ID, liven, make_model, prompt_with_image, random_pixels, right_padded
from torch import nn

from sparsevl.model.vlm import causal_lm_loss, pop_module_losses

NEW_TOKENS = 8


@pytest.fixture(scope="module")
def lively():
    torch.manual_seed(0)
    model = liven(make_model("tiny-llama", "tiny-clip")[0])
    ids, mask = right_padded([prompt_with_image(8, 1), prompt_with_image(3, 0)])
    return model, ids, mask, random_pixels(2)


def test_a_row_that_meets_eos_stops_while_the_other_goes_on(lively):
    model, ids, mask, pixels = lively
    free = model.generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)
    # an eos that row 0 emits at step `stop` and row 1 never does
    stop = next(i for i, t in enumerate(free[0]) if t not in free[0][:i] and t not in free[1] and i > 0)
    eos = free[0][stop]
    steps, merged = [], []
    stopped = model.generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=eos, on_token=steps.append,
                             on_inputs=merged.append)
    assert not merged[0].inputs_embeds.requires_grad  # generation builds no autograd graph
    assert stopped == [free[0][:stop], free[1]]
    assert len(steps) == NEW_TOKENS  # row 1 keeps the loop going to the end
    assert [int(step[0]) for step in steps] == free[0][:stop] + [eos] * (NEW_TOKENS - stop)  # finished: eos
    assert [int(step[1]) for step in steps] == free[1]
    both = model.generate(ids, mask, pixels, max_new_tokens=NEW_TOKENS, eos_token_id=free[0][0], on_token=[].append)
    assert both[0] == []  # eos first: nothing returned for that row


def test_generation_ends_as_soon_as_every_row_has_finished(lively):
    model, ids, mask, pixels = lively
    free = model.generate(ids[:1], mask[:1], pixels[:1], max_new_tokens=NEW_TOKENS, eos_token_id=EOS_ID)[0]
    stop = next(i for i, t in enumerate(free) if i > 0 and t not in free[:i])
    steps = []
    tokens = model.generate(ids[:1], mask[:1], pixels[:1], max_new_tokens=NEW_TOKENS, eos_token_id=free[stop],
                            on_token=steps.append)
    assert len(steps) == stop + 1 and tokens == [free[:stop]]  # no step after the only row finished


def test_sampling_draws_from_the_tempered_softmax(lively):
    """Oracle: the same generator drawing from softmax(logits / T) of full forward passes."""
    model, _, _, pixels = lively
    row, pixels = prompt_with_image(6, 1), pixels[:1]
    ids, mask = right_padded([row])
    ours = model.generate(ids, mask, pixels, max_new_tokens=8, eos_token_id=EOS_ID, temperature=0.7,
                          generator=torch.Generator().manual_seed(5))[0]
    generator, tokens = torch.Generator().manual_seed(5), []
    for _ in range(8):
        sequence = torch.tensor([row + tokens])
        logits = model(sequence, torch.ones_like(sequence), pixels).logits[0, -1]
        token = int(torch.multinomial(torch.softmax(logits / 0.7, -1), 1, generator=generator))
        if token == EOS_ID:
            break
        tokens.append(token)
    assert ours == tokens and len(set(tokens)) > 2


def gpt2_model():
    """The tiny VLM with a GPT-2 LM: absolute position embeddings, so positions shifted by padding would show."""
    from transformers import GPT2Config, GPT2LMHeadModel

    model, _ = make_model("tiny-llama", "tiny-clip")
    model.llm = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=128, n_layer=2, n_head=4, n_positions=256)).eval()
    return model


@pytest.mark.parametrize("llm", ["lively llama", "gpt2"])
def test_lm_logits_honours_left_padding_and_logits_to_keep(lively, llm):
    model, ids, mask, pixels = lively
    model = model if llm == "lively llama" else gpt2_model()
    inputs, _ = model.prepare_inputs(ids, mask, pixels, padding_side="left")
    logits = model.lm_logits(inputs)  # (batch, seq, vocab)
    short = inputs.attention_mask[1].sum()  # row 1 is left padded
    single, _ = model.prepare_inputs(ids[1:, :3], mask[1:, :3], pixels[1:])
    torch.testing.assert_close(logits[1, -short:], model.lm_logits(single)[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(model.lm_logits(inputs, logits_to_keep=1), logits[:, -1:], atol=1e-5, rtol=1e-5)


class Lossy(nn.Module):
    def __init__(self, losses):
        super().__init__()
        self.losses = losses

    def pop_losses(self):
        return self.losses


def test_module_losses_are_summed_per_name_with_the_prefix():
    root = nn.Sequential(Lossy({"balance": torch.tensor(1.0), "z": torch.tensor(2.0)}), nn.Linear(1, 1),
                         nn.Sequential(Lossy({"balance": torch.tensor(3.0)})))
    assert pop_module_losses(root, prefix="llm_") == {"llm_balance": torch.tensor(4.0), "llm_z": torch.tensor(2.0)}
    assert pop_module_losses(nn.Linear(1, 1), prefix="llm_") == {}


def test_a_batch_without_labels_has_zero_loss_that_still_backpropagates():
    logits = torch.randn(2, 4, 5, requires_grad=True)
    loss = causal_lm_loss(logits, torch.full((2, 4), -100))
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_gradient_checkpointing_gives_the_same_gradients():
    rows = [prompt_with_image(7, 1), prompt_with_image(5, 0)]
    ids, mask = right_padded(rows)
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    grads = []
    for checkpointing in (False, True):
        model, _ = make_model("tiny-llama", "tiny-clip", seed=3)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.llm.is_gradient_checkpointing and model.vision_tower.encoder.is_gradient_checkpointing
        model(ids, mask, random_pixels(2), labels).losses["lm"].backward()
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("vision_tower" in name for name in grads[0])
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_image_count_errors_say_exactly_what_is_wrong():
    model, _ = make_model()
    ids, mask = right_padded([prompt_with_image(6, 1)])
    with pytest.raises(ValueError) as error:
        model(ids, mask, random_pixels(2))
    assert str(error.value) == "the batch has 2 images but 1 <image> placeholders"
    with pytest.raises(ValueError) as error:
        model(ids, mask, None)
    assert str(error.value) == "text has more <image> placeholders than the 0 images given"
    two, two_mask = right_padded([prompt_with_image(6, 1)[:3] + prompt_with_image(6, 1)[1:]])
    with pytest.raises(ValueError) as error:
        model(two, two_mask, random_pixels(1))
    assert str(error.value) == "text has more <image> placeholders than the 1 images given"


def test_default_generation_is_cached_and_sixteen_tokens_long(lively):
    model, ids, mask, pixels = lively
    lengths = []
    hook = model.llm.register_forward_pre_hook(lambda module, args, kwargs: lengths.append(
        kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        tokens = model.generate(ids, mask, pixels, eos_token_id=-1)  # an eos no row emits
    finally:
        hook.remove()
    prompt = int(mask.sum(1).max()) - 1 + model.num_image_tokens  # the placeholder becomes the image's tokens
    assert [len(row) for row in tokens] == [16, 16]
    assert lengths == [prompt] + [1] * 15  # the prompt once, then one new token per step


def test_on_kept_sees_the_prompt_positions_the_pruner_kept_once(lively):
    from sparsevl.model.pruning import PruningPlan, PruningStep

    model, ids, mask, pixels = lively
    model.pruning = PruningPlan("random", (PruningStep(1, 8),))
    try:
        seen, merged = [], []
        model.generate(ids, mask, pixels, max_new_tokens=3, eos_token_id=-1, on_kept=seen.append,
                       on_inputs=merged.append)
    finally:
        model.pruning = None
    assert len(seen) == 1  # the prefill decides, once
    inputs, kept = merged[0], seen[0]
    for row in range(len(kept)):
        positions = kept[row][kept[row] >= 0]
        valid = inputs.attention_mask[row].bool()
        text = (valid & ~inputs.image_mask[row]).nonzero().flatten()
        assert set(text.tolist()) <= set(positions.tolist())  # every text token stays
        assert int(inputs.image_mask[row][positions].sum()) == 8  # and 8 of the image's tokens
        assert int((kept[row] == -1).sum()) == kept.shape[1] - len(positions)  # -1 marks only the fill
        assert len(positions) == len(text) + 8
    assert int((kept == -1).sum()) > 0  # the shorter row has fill


def test_batched_generation_with_absolute_positions_equals_each_row_alone():
    """GPT-2 adds position embeddings: a left-padded row must count its positions from its first real token."""
    model = gpt2_model()
    rows = [prompt_with_image(9, 1), prompt_with_image(4, 0)]
    pixels = random_pixels(2)

    def step_logits(rows, pixels):
        steps = []
        hook = model.llm.register_forward_hook(lambda module, args, out: steps.append(out.logits[:, -1]))
        try:
            model.generate(*right_padded(rows), pixels, max_new_tokens=3, eos_token_id=-1)
        finally:
            hook.remove()
        return torch.stack(steps, 1)  # (batch, steps, vocab)

    batched = step_logits(rows, pixels)
    for i, row in enumerate(rows):
        torch.testing.assert_close(batched[i], step_logits([row], pixels[i:i + 1])[0], atol=1e-5, rtol=1e-5)


def test_next_token_samples_from_the_softmax_of_logits_over_temperature():
    from sparsevl.model.vlm import _next_token

    logits = torch.tensor([[0.0, float(torch.log(torch.tensor(2.0)))]]).expand(4000, -1)  # probabilities 1 : 2
    draws = _next_token(logits, 0.5, torch.Generator().manual_seed(0))  # at T = 0.5: 1 : 4, so 0.8 pick token 1
    assert abs(float(draws.float().mean()) - 0.8) < 0.03
    assert _next_token(logits[:2], 0.0, None).tolist() == [1, 1]  # greedy


def test_inputs_merged_without_labels_carry_none():
    model, _ = make_model("tiny-llama", "tiny-clip")
    ids, mask = right_padded([prompt_with_image(5, 1)])
    inputs, _ = model.prepare_inputs(ids, mask, random_pixels(1))
    assert inputs.labels is None


def test_adaptive_layer_choice_reads_the_instruction_of_each_image():
    """The images are encoded with the classifier's instruction vectors, computed from the prompt's embeddings."""
    model, _ = make_model("tiny-llama", "tiny-clip", use_adaptive_layer_selection=True,
                          layer_classifier_use_text=True)
    ids, mask = right_padded([prompt_with_image(7, 1), prompt_with_image(5, 2)])
    seen, encode = [], model.encode_images
    model.encode_images = lambda pixels, instruction=None: (seen.append(instruction), encode(
        pixels, instruction=instruction))[1]
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # answer tokens: not part of the instruction
    with torch.no_grad():
        model.prepare_inputs(ids, mask, random_pixels(2), labels)
        embeds = model.llm.get_input_embeddings()(ids)
        expected = model.layer_selector.instruction_per_image(embeds, ids, mask, labels,
                                                              image_token_id=model.image_token_id)
        with_answers = model.layer_selector.instruction_per_image(embeds, ids, mask, None,
                                                                  image_token_id=model.image_token_id)
    assert expected.shape[0] == 2 and len(seen) == 1 and torch.equal(seen[0], expected)
    assert not torch.allclose(expected, with_answers)


def test_an_empty_pixel_batch_is_a_text_only_batch():
    model, _ = make_model("tiny-llama", "tiny-clip")
    ids, mask = right_padded([[5, 6, 7, 8]])
    with torch.no_grad():
        empty, _ = model.prepare_inputs(ids, mask, torch.empty(0, 3, 64, 64))
        none, _ = model.prepare_inputs(ids, mask, None)
    assert torch.equal(empty.inputs_embeds, none.inputs_embeds) and not empty.image_mask.any()


def test_merge_splices_each_image_at_its_placeholder_by_hand():
    from tiny import IMAGE_TOKEN_ID

    from sparsevl.model.vlm import IGNORE_INDEX

    model, _ = make_model("tiny-llama", "tiny-clip")
    ids = torch.tensor([[5, IMAGE_TOKEN_ID, 6, IMAGE_TOKEN_ID, 7], [8, 9, IMAGE_TOKEN_ID, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    labels = torch.tensor([[-100, -100, 6, -100, 7], [-100, 9, -100, -100, -100]])
    text = torch.arange(2 * 5 * 2, dtype=torch.float32).view(2, 5, 2)  # a distinct value per token
    images = -1 - torch.arange(3 * 2 * 2, dtype=torch.float64).view(3, 2, 2)  # 3 images of 2 tokens
    merged = model.merge_inputs(ids, mask, text, images, labels)
    t, i = text[0], images.float()
    expected = torch.stack([t[0], i[0, 0], i[0, 1], t[2], i[1, 0], i[1, 1], t[4]])
    assert merged.inputs_embeds.dtype == torch.float32  # images take the text's dtype
    assert torch.equal(merged.inputs_embeds[0], expected)
    assert torch.equal(merged.inputs_embeds[1, :4], torch.stack([text[1, 0], text[1, 1], i[2, 0], i[2, 1]]))
    assert not merged.inputs_embeds[1, 4:].any()  # right padding
    assert merged.image_mask.tolist() == [[False, True, True, False, True, True, False],
                                          [False, False, True, True, False, False, False]]
    assert merged.attention_mask.tolist() == [[1] * 7, [1, 1, 1, 1, 0, 0, 0]]
    assert merged.position_ids[1].tolist()[:4] == [0, 1, 2, 3]
    ignore = IGNORE_INDEX
    assert merged.labels.tolist() == [[ignore, ignore, ignore, 6, ignore, ignore, 7],
                                      [ignore, 9, ignore, ignore, ignore, ignore, ignore]]
