"""Conversation templates: LLaVA `conversations` -> input_ids + labels (only assistant tokens are labelled).

Each segment is tokenized on its own, so the tokens of an answer are the same in training and in a
generation prompt. `<image>` stays one placeholder token here; the model expands it.
"""

from dataclasses import dataclass

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
HUMAN_ROLES = ("human", "user")
ASSISTANT_ROLES = ("gpt", "assistant")
TEMPLATES = ("chat", "plain")


class BadSampleError(ValueError):
    """A record that cannot be trained on; the message says what is wrong with it."""


@dataclass
class TokenizedConversation:
    input_ids: list[int]
    labels: list[int]
    num_images: int


def check_turns(turns, *, num_images: int) -> None:
    """Validate roles, values and the `<image>` count; raise BadSampleError naming the problem."""
    if not isinstance(turns, list) or not turns:
        raise BadSampleError("`conversations` must be a non-empty list of turns")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise BadSampleError(f"turn {index} must be an object with `from` and `value`")
        role, value = turn["from"], turn["value"]
        expected = HUMAN_ROLES if index % 2 == 0 else ASSISTANT_ROLES
        if role not in HUMAN_ROLES + ASSISTANT_ROLES:
            raise BadSampleError(f"turn {index} has unknown role {role!r} (expected one of "
                                 f"{HUMAN_ROLES + ASSISTANT_ROLES})")
        if role not in expected:
            raise BadSampleError(f"turn {index} is from {role!r}; turns must alternate human, gpt, human, ...")
        if not isinstance(value, str):
            raise BadSampleError(f"turn {index} value must be a string")
        if not _is_valid_unicode(value):
            raise BadSampleError(f"turn {index} is not valid Unicode text (a lone surrogate such as \\ud800)")
        if role in ASSISTANT_ROLES and not value.strip():
            raise BadSampleError(f"turn {index} is an empty assistant answer")
    found = sum(turn["value"].count(IMAGE_TOKEN) for turn in turns)
    if found != num_images:
        raise BadSampleError(f"conversation has {found} {IMAGE_TOKEN} placeholders but the record has "
                             f"{num_images} image(s)")


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _segments(turns: list[dict], template: str, eos: str) -> list[tuple[str, bool]]:
    """(text, is_labelled) pieces of a conversation in the template's format."""
    if template == "plain":  # LLaVA pretraining: the image, then the answer; the question is dropped
        images = IMAGE_TOKEN * turns[0]["value"].count(IMAGE_TOKEN)
        return [(images + "\n", False), (turns[1]["value"].strip(), True), (eos, True)]
    pieces = []
    for turn in turns:
        if turn["from"] in HUMAN_ROLES:
            pieces.append((f"USER: {turn['value'].strip()}\n", False))
        else:
            pieces += [("ASSISTANT: ", False), (turn["value"].strip(), True), (eos, True), ("\n", False)]
    return pieces


def tokenize_conversation(turns: list[dict], tokenizer, *, template: str, max_length: int,
                          num_image_tokens: int, num_images: int) -> TokenizedConversation:
    """Tokenize and label a validated conversation; truncate text, never the image tokens."""
    if template not in TEMPLATES:
        raise ValueError(f"--conversation_template {template!r} is unknown; choose from {TEMPLATES}")
    check_turns(turns, num_images=num_images)
    input_ids, labels = [], []
    for text, is_labelled in _segments(turns, template, tokenizer.eos_token):
        ids = tokenizer(text, add_special_tokens=False).input_ids
        input_ids += ids
        labels += ids if is_labelled else [IGNORE_INDEX] * len(ids)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    extra_per_image = num_image_tokens - 1  # each placeholder becomes num_image_tokens embeddings
    budget = max_length - extra_per_image * num_images
    if len(input_ids) > budget:
        if image_id in input_ids[budget:]:
            raise BadSampleError(f"an {IMAGE_TOKEN} lies beyond --model_max_length {max_length}; "
                                 "its visual tokens cannot be split")
        input_ids, labels = input_ids[:budget], labels[:budget]
    if all(label == IGNORE_INDEX for label in labels):
        raise BadSampleError(f"no assistant tokens remain within --model_max_length {max_length}")
    return TokenizedConversation(input_ids, labels, num_images)


def prompt_ids(question: str, tokenizer, *, template: str = "chat", history: list[dict] = ()) -> list[int]:
    """Token ids of a generation prompt: earlier turns, the new question, then the assistant prefix."""
    if template == "plain":
        return tokenizer(IMAGE_TOKEN * question.count(IMAGE_TOKEN) + "\n", add_special_tokens=False).input_ids
    ids = []
    for text, _ in _segments(list(history), template, tokenizer.eos_token):
        ids += tokenizer(text, add_special_tokens=False).input_ids
    for text in (f"USER: {question.strip()}\n", "ASSISTANT: "):
        ids += tokenizer(text, add_special_tokens=False).input_ids
    return ids
