"""Chat and web-demo logic without a browser: streaming generation, conversation history, upload checks,
kept-token overlay, expert load, and `sparsevl chat` fed from a pipe."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from sparsevl.data.conversation import prompt_ids
from sparsevl.serve.answer_text import AnswerText
from sparsevl.serve.assistant import UploadError, VisionAssistant, describe_expert_load, \
    kept_token_overlay, open_upload
from sparsevl.serve.chat import ChatSession
from sparsevl.serve.web import DemoHandlers, is_loopback, parser as serve_parser
from tiny import make_model, prompt_with_image, random_pixels, right_padded

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assistant(tiny_checkpoint):
    return VisionAssistant.load(tiny_checkpoint)


@pytest.fixture(scope="module")
def image(shapes_dir):
    return Image.open(shapes_dir / "images" / "test" / "000000.png").convert("RGB")


def test_generate_streams_exactly_the_tokens_it_returns():
    model, _ = make_model()
    ids, mask = right_padded([prompt_with_image(6), prompt_with_image(9, image_at=3)])
    steps, seen = [], []
    tokens = model.generate(ids, mask, random_pixels(2), max_new_tokens=5, eos_token_id=1,
                            on_inputs=seen.append, on_token=steps.append)
    assert tokens == model.generate(ids, mask, random_pixels(2), max_new_tokens=5, eos_token_id=1)
    streamed = torch.stack(steps, dim=1).tolist()  # (batch, steps)
    assert [row[: len(t)] for row, t in zip(streamed, tokens)] == tokens
    assert seen[0].image_mask.sum(dim=1).tolist() == [model.num_image_tokens] * 2


def test_answer_text_reassembles_the_answer_and_holds_back_split_characters(shapes_tokenizer):
    text = "a red circle and a blue square ü"
    ids = shapes_tokenizer(text, add_special_tokens=False).input_ids
    pieces = []
    answer = AnswerText(shapes_tokenizer)
    for token in ids:
        pieces.append(answer.push(token))
        assert not "".join(pieces).endswith("\ufffd")  # a split character is held back until complete
    pieces.append(answer.finish())
    assert "".join(pieces) == text == answer.text
    assert answer.ids == ids


def test_sampled_answer_equals_generate_with_the_same_seed(assistant, image):
    ids = prompt_ids("<image>\nwhat shape?", assistant.tokenizer)
    pixels = assistant.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    for seed in (0, 1):
        answer = assistant.ask(image, "what shape?", max_new_tokens=6, temperature=1.0, seed=seed)
        expected = assistant.model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                                            max_new_tokens=6, eos_token_id=assistant.tokenizer.eos_token_id,
                                            temperature=1.0, generator=torch.Generator().manual_seed(seed))[0]
        assert answer.token_ids == expected


def test_answer_matches_plain_generate_and_reports_all_patches_kept(assistant, image):
    pieces = []
    answer = assistant.ask(image, "what color is the shape?", max_new_tokens=6, on_text=pieces.append)
    ids = prompt_ids("<image>\nwhat color is the shape?", assistant.tokenizer)
    pixels = assistant.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    expected = assistant.model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                                        max_new_tokens=6, eos_token_id=assistant.tokenizer.eos_token_id)[0]
    assert answer.token_ids == expected and len(expected) > 0
    assert answer.text == assistant.tokenizer.decode(expected, skip_special_tokens=True).strip()
    assert "".join(pieces).rstrip() == answer.text
    assert answer.num_visual_tokens == 64 and answer.kept_patches == list(range(64))
    assert answer.expert_load is None and describe_expert_load(None).startswith("dense model")


def test_history_goes_into_the_prompt_with_the_image_in_the_first_question(assistant):
    history = [{"from": "human", "value": "q one"}, {"from": "gpt", "value": "a one"}]
    ids = assistant.prompt("q two", history, max_new_tokens=4)
    expected_history = [{"from": "human", "value": "<image>\nq one"}, {"from": "gpt", "value": "a one"}]
    assert ids == prompt_ids("q two", assistant.tokenizer, history=expected_history)
    assert ids.count(assistant.model.image_token_id) == 1


def test_oldest_exchanges_are_dropped_to_fit_the_context(assistant):
    history = [{"from": "human", "value": "first question " * 20}, {"from": "gpt", "value": "first answer " * 20},
               {"from": "human", "value": "q two"}, {"from": "gpt", "value": "a two"}]
    full = assistant.prompt("q three", history, max_new_tokens=4)
    config = assistant.model.llm.config
    original = config.max_position_embeddings
    config.max_position_embeddings = len(full) + 63 + 4 - 1  # one token short of the full conversation
    try:
        trimmed = assistant.prompt("q three", history, max_new_tokens=4)
        with pytest.raises(ValueError, match="too long for the model's context"):
            assistant.prompt("q three " * 200, [], max_new_tokens=4)
    finally:
        config.max_position_embeddings = original
    assert trimmed == assistant.prompt("q three", history[2:], max_new_tokens=4)
    assert trimmed.count(assistant.model.image_token_id) == 1


def test_chat_session_keeps_history_and_obeys_commands(assistant, shapes_dir):
    from io import StringIO

    out = StringIO()
    session = ChatSession(assistant, str(shapes_dir / "images" / "test" / "000000.png"), out=out,
                          temperature=0.0, max_new_tokens=3, seed=0)
    assert session.handle("what shape?") and session.handle("and the colour?")
    assert [turn["value"] for turn in session.history[::2]] == ["what shape?", "and the colour?"]
    assert session.handle("/reset") and session.history == []
    assert session.handle("/nope") and "unknown command '/nope'" in out.getvalue()
    assert session.handle("/quit") is False
    assert out.getvalue().count("ASSISTANT: ") == 2


def test_chat_cli_answers_piped_questions_and_reset_forgets(tiny_checkpoint, shapes_dir, assistant, image,
                                                            single_thread):
    # one thread here as in the CLI's process: a random model's near-tied logits must be summed in the same order
    image_path = shapes_dir / "images" / "test" / "000000.png"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    stdin = "what shape?\nwhat colour?\n/reset\nwhat shape?\n/quit\nnever asked\n"
    run = subprocess.run([sys.executable, "-m", "sparsevl", "chat", "--model", str(tiny_checkpoint), "--image",
                          str(image_path), "--max_new_tokens", "5"], input=stdin, capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    answers = [line.removeprefix("ASSISTANT: ").rstrip() for line in run.stdout.splitlines() if line.startswith("ASSISTANT:")]
    assert len(answers) == 3
    first = assistant.ask(image, "what shape?", max_new_tokens=5)
    assert answers[0] == first.text and answers[2] == answers[0]  # after /reset: the same as a fresh start
    second = assistant.ask(image, "what colour?", max_new_tokens=5,
                           history=[{"from": "human", "value": "what shape?"}, {"from": "gpt", "value": first.text}])
    assert answers[1] == second.text


def test_chat_cli_names_a_missing_image(tiny_checkpoint, tmp_path):
    from sparsevl.serve.chat import main

    assert main(["--model", str(tiny_checkpoint), "--image", str(tmp_path / "none.png")]) == 2


def test_uploads_are_checked_for_size_type_and_pixels(tmp_path, image):
    png, text, tiff, huge = tmp_path / "ok.png", tmp_path / "fake.png", tmp_path / "scan.tiff", tmp_path / "huge.png"
    image.save(png)
    text.write_text("not an image at all")
    image.save(tiff)
    Image.new("RGB", (300, 300)).save(huge)
    assert open_upload(png, max_bytes=2**20).size == image.size
    with pytest.raises(UploadError, match=r"ok.png is 0.0 MB; the limit is"):
        open_upload(png, max_bytes=10)
    with pytest.raises(UploadError, match="fake.png is not an image"):
        open_upload(text, max_bytes=2**20)
    with pytest.raises(UploadError, match="scan.tiff is a TIFF image"):
        open_upload(tiff, max_bytes=2**20)
    with pytest.raises(UploadError, match="huge.png is 300x300 pixels"):
        open_upload(huge, max_bytes=2**20, max_pixels=256 * 256)


def test_web_handler_rejects_with_a_message_and_answers_valid_uploads(assistant, tmp_path, image):
    handlers = DemoHandlers(assistant, max_upload_bytes=2**20)
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    answer, message, overlay, _, _ = handlers.answer(str(bad), "what?", 4, 0.0)
    assert answer == "" and overlay is None and "notes.png is not an image" in message
    good = tmp_path / "good.png"
    image.save(good)
    answer, message, overlay, kept_note, experts = handlers.answer(str(good), "what shape?", 4, 0.0)
    assert message == "" and answer == assistant.ask(image, "what shape?", max_new_tokens=4).text
    assert overlay.size == (256, 256) and kept_note.startswith("64 of 64 visual tokens kept")
    assert experts.startswith("dense model")
    assert handlers.answer(str(good), "   ", 4, 0.0)[1] == "the question is empty"


def test_overlay_darkens_exactly_the_dropped_patches():
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    overlay = np.asarray(kept_token_overlay(white, [0, 5, 63], (8, 8), size=256)).astype(float)
    cells = overlay.reshape(8, 32, 8, 32, 3)[:, 4:-4, :, 4:-4].mean(axis=(1, 3, 4))  # cell interiors, no grid lines
    kept = np.zeros((8, 8), dtype=bool)
    kept.flat[[0, 5, 63]] = True
    assert (cells[kept] > 250).all() and (cells[~kept] < 100).all()
    everything = np.asarray(kept_token_overlay(white, None, (8, 8), size=256)).astype(float)
    assert everything.reshape(8, 32, 8, 32, 3)[:, 4:-4, :, 4:-4].min() > 250


class CountingProjector(nn.Module):
    """A stand-in MoE layer: sends every even visual token to expert 0 and every odd one to expert 1."""

    def __init__(self, projector: nn.Module):
        super().__init__()
        self.projector = projector
        self.register_buffer("expert_token_counts", torch.zeros(2, dtype=torch.long), persistent=False)

    def forward(self, features):
        tokens = features.shape[0] * features.shape[1]
        self.expert_token_counts += torch.tensor([(tokens + 1) // 2, tokens // 2])
        return self.projector(features)


def test_expert_load_counts_only_this_answer(assistant, image):
    model, _ = make_model()
    model.projector = CountingProjector(model.projector)
    model.projector.expert_token_counts += 1000  # counts from earlier calls must not leak into this answer
    moe = VisionAssistant(model, assistant.tokenizer, assistant.image_processor)
    moe.model.image_token_id = assistant.model.image_token_id
    model.llm.resize_token_embeddings(len(assistant.tokenizer))
    answer = moe.ask(image, "what shape?", max_new_tokens=2)
    assert answer.expert_load == {"projector": [32, 32]}
    table = describe_expert_load(answer.expert_load)
    assert "| projector | 32 (50%) | 32 (50%) |" in table


def test_serve_binds_loopback_by_default():
    assert serve_parser().parse_args(["--model", "m"]).host == "127.0.0.1"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")


def test_token_pruner_flags_reach_the_model_and_a_full_budget_changes_nothing(lively_checkpoint, image):
    from sparsevl.serve.chat import parser as chat_parser

    base = ["--model", str(lively_checkpoint), "--image", "x.png"]
    pruned = VisionAssistant.load(lively_checkpoint, chat_parser().parse_args(
        base + ["--token_pruner", "sparsevlm", "--pruning_layers", "1", "--retained_tokens", "2"]))
    assert pruned.model.pruning is not None
    keep_all = VisionAssistant.load(lively_checkpoint, chat_parser().parse_args(
        base + ["--token_pruner", "random", "--pruning_layers", "1", "--retained_tokens", "64"]))
    plain = VisionAssistant.load(lively_checkpoint, chat_parser().parse_args(base))
    assert plain.model.pruning is None
    question = "what shape?"
    expected = plain.ask(image, question, max_new_tokens=5).text
    assert keep_all.ask(image, question, max_new_tokens=5).text == expected
    assert pruned.ask(image, question, max_new_tokens=5).text != expected  # 2 of 64 visual tokens: another answer
    assert serve_parser().parse_args(["--model", "m", "--token_pruner", "fastv"]).token_pruner == "fastv"


def test_overlay_shows_the_patches_a_pruner_kept_inside_the_llm(tiny_checkpoint, image):
    from sparsevl.serve.chat import parser as chat_parser

    args = chat_parser().parse_args(["--model", str(tiny_checkpoint), "--image", "x.png", "--token_pruner", "random",
                                     "--pruning_layers", "1", "--retained_tokens", "8"])
    pruned = VisionAssistant.load(tiny_checkpoint, args)
    answer = pruned.ask(image, "what shape?", max_new_tokens=3)
    assert answer.num_visual_tokens == 64 and len(answer.kept_patches) == 8
    # the same prompt through the model's forward names the same survivors
    ids = pruned.prompt("what shape?", [], 3)
    pixels = pruned.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    out = pruned.model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                       return_hidden_states=True)
    first_visual = int(out.inputs.image_mask[0].nonzero()[0])
    expected = sorted(p - first_visual for p in out.kept_index[0].tolist() if out.inputs.image_mask[0, p])
    assert answer.kept_patches == expected
