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
