import json

import pytest
from jinja2 import TemplateError
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from sparsevl.data.shapes import COLOURS, SHAPES, generate_shapes_dataset
from sparsevl.data.tokenizer import (
    IMAGE_TOKEN,
    add_image_token,
    build_tokenizer,
    load_tokenizer,
    save_tokenizer,
    texts_from_llava_json,
)

ANSWER_WORDS = [*COLOURS, *SHAPES, *"123456", "yes", "no"]
CONVERSATION = [
    {"role": "human", "content": "<image>\nWhat colour is the circle?"},
    {"role": "gpt", "content": "red"},
    {"role": "user", "content": "Where is the red circle?"},
    {"role": "assistant", "content": "top left"},
]


@pytest.fixture(scope="module")
def llava_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    generate_shapes_dataset(out, num_train=200, num_test=2, seed=0)
    return [out / "captions.json", out / "finetune.json"]


@pytest.fixture(scope="module")
def tokenizer(llava_files):
    return build_tokenizer(texts_from_llava_json(llava_files), vocab_size=512)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_texts_from_llava_json_strips_the_image_token(llava_files):
    texts = list(texts_from_llava_json(llava_files))
    num_turns = sum(len(r["conversations"]) for path in llava_files for r in json.loads(path.read_text()))
    assert len(texts) == num_turns
    assert texts[0] == "Describe the image."
    assert not any(IMAGE_TOKEN in t for t in texts)


def test_special_tokens_and_vocab_size(tokenizer):
    assert len(tokenizer) <= 512
    assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token) == ("<pad>", "<|endoftext|>", None)
    assert tokenizer.image_token == IMAGE_TOKEN
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<pad>", "<|endoftext|>", IMAGE_TOKEN]


def test_image_token_is_one_id_and_never_split(tokenizer):
    image_id = tokenizer.image_token_id
    assert ids(tokenizer, IMAGE_TOKEN) == [image_id]
    for text in ("x<image>y", "<image>\nWhat", "red<image><image>circle"):
        assert ids(tokenizer, text).count(image_id) == text.count(IMAGE_TOKEN)
    assert IMAGE_TOKEN not in tokenizer.decode(ids(tokenizer, "<imag e>"))


def test_answer_words_are_single_tokens_alone_and_after_the_prompt(tokenizer):
    assert all(len(ids(tokenizer, word)) == 1 for word in ANSWER_WORDS)
    prompt = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    for word in ANSWER_WORDS:
        full = tokenizer.apply_chat_template([CONVERSATION[0], {"role": "gpt", "content": word}], tokenize=False)
        assert ids(tokenizer, full) == ids(tokenizer, prompt) + ids(tokenizer, word) + ids(tokenizer, "<|endoftext|>\n")


def test_chat_template_renders_exactly(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == (
        "USER: <image>\nWhat colour is the circle?\nASSISTANT: red<|endoftext|>\n"
        "USER: Where is the red circle?\nASSISTANT: top left<|endoftext|>\n"
    )
    prompt = tokenizer.apply_chat_template(CONVERSATION[:3], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|endoftext|>\nUSER: Where is the red circle?\nASSISTANT: ")
    with pytest.raises(TemplateError, match="unknown role system"):
        tokenizer.apply_chat_template([{"role": "system", "content": "hi"}], tokenize=False)


def test_save_load_round_trip_gives_identical_ids(tokenizer, tmp_path):
    save_tokenizer(tokenizer, tmp_path)
    loaded = load_tokenizer(tmp_path)
    text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert ids(loaded, text) == ids(tokenizer, text)
    assert loaded.chat_template == tokenizer.chat_template
    assert (loaded.image_token_id, loaded.pad_token_id, loaded.eos_token_id, len(loaded)) == (
        tokenizer.image_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id, len(tokenizer)
    )


def test_build_rejects_a_vocab_too_small():
    with pytest.raises(ValueError, match="vocab_size=100"):
        build_tokenizer(["red circle"], vocab_size=100)


def plain_tokenizer(**special_tokens) -> PreTrainedTokenizerFast:
    """A byte-level BPE without `<image>`, standing in for a real LLM's tokenizer."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(["the red circle is top left"] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, **special_tokens)


def test_add_image_token_to_a_tokenizer_without_it():
    tok = plain_tokenizer(eos_token="</s>")
    size = len(tok)
    assert len(ids(tok, IMAGE_TOKEN)) > 1
    image_id = add_image_token(tok)
    assert (image_id, len(tok)) == (size, size + 1)
    assert ids(tok, "a <image>\nred").count(image_id) == 1 and ids(tok, IMAGE_TOKEN) == [image_id]
    assert tok.pad_token == "</s>"
    assert add_image_token(tok) == image_id and len(tok) == size + 1  # idempotent


def test_add_image_token_needs_a_pad_or_eos_token():
    with pytest.raises(ValueError, match="neither a pad nor an eos token"):
        add_image_token(plain_tokenizer())
