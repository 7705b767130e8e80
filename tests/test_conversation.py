"""Conversation templates: which tokens carry labels, truncation, and validation errors."""

import pytest

from sparsevl.data.conversation import IGNORE_INDEX, BadSampleError, prompt_ids, tokenize_conversation

TURNS = [{"from": "human", "value": "<image>\nWhat colour is the circle?"}, {"from": "gpt", "value": "red"},
         {"from": "human", "value": "How many objects are there?"}, {"from": "gpt", "value": "3"}]


def labelled_text(tokenizer, tokenized) -> list[str]:
    """Decode each maximal run of labelled tokens."""
    runs, current = [], []
    for token, label in zip(tokenized.input_ids, tokenized.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_only_assistant_answers_and_eos_are_labelled(shapes_tokenizer):
    tok = shapes_tokenizer
    out = tokenize_conversation(TURNS, tok, template="chat", max_length=512, num_image_tokens=64, num_images=1)
    eos = tok.eos_token
    assert labelled_text(tok, out) == [f"red{eos}", f"3{eos}"]
    assert tok.decode(out.input_ids) == (f"USER: <image>\nWhat colour is the circle?\nASSISTANT: red{eos}\n"
                                         f"USER: How many objects are there?\nASSISTANT: 3{eos}\n")
    assert out.input_ids.count(tok.convert_tokens_to_ids("<image>")) == 1


def test_generation_prompt_is_the_training_prefix(shapes_tokenizer):
    tok = shapes_tokenizer
    out = tokenize_conversation(TURNS[:2], tok, template="chat", max_length=512, num_image_tokens=64, num_images=1)
    prompt = prompt_ids(TURNS[0]["value"], tok)
    assert out.input_ids[: len(prompt)] == prompt
    assert all(label == IGNORE_INDEX for label in out.labels[: len(prompt)])


def test_plain_template_labels_the_caption_only(shapes_tokenizer):
    tok = shapes_tokenizer
    out = tokenize_conversation(TURNS[:2], tok, template="plain", max_length=512, num_image_tokens=64, num_images=1)
    assert tok.decode(out.input_ids) == f"<image>\nred{tok.eos_token}"
    assert labelled_text(tok, out) == [f"red{tok.eos_token}"]


def test_truncation_counts_visual_tokens_and_keeps_the_image(shapes_tokenizer):
    tok = shapes_tokenizer
    full = tokenize_conversation(TURNS, tok, template="chat", max_length=512, num_image_tokens=64, num_images=1)
    limit = 64 + len(full.input_ids) - 4  # four text tokens too many
    cut = tokenize_conversation(TURNS, tok, template="chat", max_length=limit, num_image_tokens=64, num_images=1)
    assert len(cut.input_ids) + 63 == limit
    assert cut.input_ids == full.input_ids[: len(cut.input_ids)]
    with pytest.raises(BadSampleError, match="no assistant tokens remain"):
        tokenize_conversation(TURNS, tok, template="chat", max_length=64 + 10, num_image_tokens=64, num_images=1)
    late_image = [{"from": "human", "value": "What colour is the circle? " * 5 + "<image>"}, TURNS[1]]
    with pytest.raises(BadSampleError, match="cannot be split"):
        tokenize_conversation(late_image, tok, template="chat", max_length=64 + 8, num_image_tokens=64, num_images=1)


@pytest.mark.parametrize("turns, num_images, message", [
    ([], 1, "non-empty list"),
    ([{"from": "gpt", "value": "red"}], 0, "must alternate"),
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "robot", "value": "x"}], 1, "unknown role 'robot'"),
    ([{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "  "}], 1, "empty assistant answer"),
    ([{"from": "human", "value": "<image><image>\nhi"}, {"from": "gpt", "value": "x"}], 1, "2 <image> placeholders"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": 3}], 0, "must be a string"),
])
def test_bad_conversations_name_the_problem(shapes_tokenizer, turns, num_images, message):
    with pytest.raises(BadSampleError, match=message):
        tokenize_conversation(turns, shapes_tokenizer, template="chat", max_length=512, num_image_tokens=4,
                              num_images=num_images)
