"""Conversation templates against the literal LLaVA-1.5 text, tokenized by a tokenizer that adds a BOS token
by default (as LLaMA's does), so that a segment tokenized with special tokens would show; errors word for word."""

import re
from types import SimpleNamespace

import pytest

from sparsevl.data.conversation import IGNORE_INDEX, BadSampleError, prompt_ids, tokenize_conversation

BOS = 2
PIECE = re.compile(r"<image>|</s>|\n|[^\s<]+| ")


class WordTokenizer:
    """One id per word, space, newline, `<image>` or `</s>`; like transformers' tokenizers, it prepends BOS
    unless called with add_special_tokens=False."""

    eos_token = "</s>"

    def __init__(self):
        self.vocab = {"<bos>": BOS, "</s>": 1, "<image>": 3}

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.vocab[token]

    def ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(piece, len(self.vocab) + 1) for piece in PIECE.findall(text)]

    def __call__(self, text: str, add_special_tokens: bool = True):
        return SimpleNamespace(input_ids=([BOS] if add_special_tokens else []) + self.ids(text))


@pytest.fixture
def tok():
    return WordTokenizer()


def test_chat_template_is_llava_1_5_text_with_answers_and_eos_labelled(tok):
    turns = [{"from": "human", "value": " <image>\nWhat colour? "}, {"from": "gpt", "value": " red "},
             {"from": "user", "value": "And the shape?"}, {"from": "assistant", "value": "circle"}]
    out = tokenize_conversation(turns, tok, template="chat", max_length=100, num_image_tokens=5, num_images=1)
    pieces = [("USER: <image>\nWhat colour?\n", False), ("ASSISTANT: ", False), ("red", True), ("</s>", True),
              ("\n", False), ("USER: And the shape?\n", False), ("ASSISTANT: ", False), ("circle", True),
              ("</s>", True), ("\n", False)]
    assert out.input_ids == [i for text, _ in pieces for i in tok.ids(text)]
    assert out.labels == [i if labelled else IGNORE_INDEX for text, labelled in pieces for i in tok.ids(text)]
    assert out.num_images == 1


def test_plain_template_is_the_image_then_the_caption(tok):
    turns = [{"from": "human", "value": "<image>\n<image>\ndescribe"}, {"from": "gpt", "value": " a red circle "}]
    out = tokenize_conversation(turns, tok, template="plain", max_length=100, num_image_tokens=5, num_images=2)
    assert out.input_ids == tok.ids("<image><image>\n") + tok.ids("a red circle") + [1]
    assert out.labels == [IGNORE_INDEX] * 3 + tok.ids("a red circle") + [1]
    assert prompt_ids("<image>\n<image>\ndescribe", tok, template="plain") == tok.ids("<image><image>\n")
    assert prompt_ids("describe", tok, template="plain") == tok.ids("\n")


def test_generation_prompt_with_history_is_the_literal_text(tok):
    history = [{"from": "human", "value": "<image>\nq one"}, {"from": "gpt", "value": "a one"}]
    expected = tok.ids("USER: <image>\nq one\n") + tok.ids("ASSISTANT: ") + tok.ids("a one") + [1] + tok.ids("\n") \
        + tok.ids("USER: q two\n") + tok.ids("ASSISTANT: ")
    assert prompt_ids(" q two ", tok, history=history) == expected
    assert prompt_ids("q", tok) == tok.ids("USER: q\n") + tok.ids("ASSISTANT: ")


def test_truncation_budget_counts_every_image(tok):
    turns = [{"from": "human", "value": "<image><image> a b c d"}, {"from": "gpt", "value": "x y z"}]
    full = tokenize_conversation(turns, tok, template="chat", max_length=100, num_image_tokens=4, num_images=2)
    # each of the 2 placeholders becomes 4 embeddings: 3 extra each, so max_length L leaves L - 6 ids
    cut = tokenize_conversation(turns, tok, template="chat", max_length=len(full.input_ids) + 6 - 2,
                                num_image_tokens=4, num_images=2)
    assert cut.input_ids == full.input_ids[:-2] and cut.labels == full.labels[:-2]
    same = tokenize_conversation(turns, tok, template="chat", max_length=len(full.input_ids) + 6,
                                 num_image_tokens=4, num_images=2)
    assert same.input_ids == full.input_ids


def test_an_image_exactly_at_the_budget_edge_is_cut_or_kept_as_a_whole(tok):
    turns = [{"from": "human", "value": "a <image>"}, {"from": "gpt", "value": "x"}]
    ids = tokenize_conversation(turns, tok, template="chat", max_length=100, num_image_tokens=1,
                                num_images=1).input_ids
    at = ids.index(3)  # the placeholder's index: a budget of `at` ids cuts it, `at + 1` keeps it
    with pytest.raises(BadSampleError) as error:
        tokenize_conversation(turns, tok, template="chat", max_length=at, num_image_tokens=1, num_images=1)
    assert str(error.value) == (f"an <image> lies beyond --model_max_length {at}; its visual tokens cannot be split")


@pytest.mark.parametrize("turns, num_images, message", [
    ([], 0, "`conversations` must be a non-empty list of turns"),
    ("hi", 0, "`conversations` must be a non-empty list of turns"),
    (["hi"], 0, "turn 0 must be an object with `from` and `value`"),
    ([{"from": "human"}], 0, "turn 0 must be an object with `from` and `value`"),
    ([{"value": "x"}], 0, "turn 0 must be an object with `from` and `value`"),
    ([{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}], 0,
     "turn 1 has unknown role 'bot' (expected one of ('human', 'user', 'gpt', 'assistant'))"),
    ([{"from": "human", "value": "q"}, {"from": "user", "value": "a"}], 0,
     "turn 1 is from 'user'; turns must alternate human, gpt, human, ..."),
    ([{"from": "human", "value": 5}, {"from": "gpt", "value": "a"}], 0, "turn 0 value must be a string"),
    ([{"from": "human", "value": "q\ud800"}, {"from": "gpt", "value": "a"}], 0,
     "turn 0 is not valid Unicode text (a lone surrogate such as \\ud800)"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": " \n"}], 0, "turn 1 is an empty assistant answer"),
    ([{"from": "human", "value": "<image> q"}, {"from": "gpt", "value": "a <image>"}], 1,
     "conversation has 2 <image> placeholders but the record has 1 image(s)"),
])
def test_bad_conversations_give_exactly_these_messages(tok, turns, num_images, message):
    with pytest.raises(BadSampleError) as error:
        tokenize_conversation(turns, tok, template="chat", max_length=100, num_image_tokens=2, num_images=num_images)
    assert str(error.value) == message


def test_unknown_template_and_no_answer_left_are_named(tok):
    turns = [{"from": "human", "value": "q " * 20}, {"from": "gpt", "value": "a"}]
    with pytest.raises(ValueError) as error:
        tokenize_conversation(turns, tok, template="vicuna", max_length=100, num_image_tokens=1, num_images=0)
    assert str(error.value) == "--conversation_template 'vicuna' is unknown; choose from ('chat', 'plain')"
    with pytest.raises(BadSampleError) as error:
        tokenize_conversation(turns, tok, template="chat", max_length=10, num_image_tokens=1, num_images=0)
    assert str(error.value) == "no assistant tokens remain within --model_max_length 10"


def test_prompts_with_a_transformers_tokenizer(shapes_tokenizer):
    """transformers' fast tokenizers refuse add_special_tokens=None, so each call must pass False itself."""
    tok = shapes_tokenizer
    assert prompt_ids("<image>\nwhat shape?", tok, template="plain") == tok("<image>\n", add_special_tokens=False).input_ids
    history = [{"from": "human", "value": "<image>\nwhat shape?"}, {"from": "gpt", "value": "circle"}]
    expected = [i for text in ("USER: <image>\nwhat shape?\n", "ASSISTANT: ", "circle", tok.eos_token, "\n",
                               "USER: what colour?\n", "ASSISTANT: ")
                for i in tok(text, add_special_tokens=False).input_ids]
    assert prompt_ids("what colour?", tok, history=history) == expected
