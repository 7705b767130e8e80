"""Tokenizers: a small byte-level BPE trained on our conversations, and `<image>` for any HF tokenizer."""

import json
import os
from typing import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sparsevl.data.shapes import IMAGE_TOKEN  # the LLaVA JSON placeholder, defined once

PAD_TOKEN = "<pad>"
EOS_TOKEN = "<|endoftext|>"
USER_PREFIX = "USER: "
ASSISTANT_PREFIX = "ASSISTANT: "

# human/user -> "USER: {content}\n"; gpt/assistant -> "ASSISTANT: {content}<|endoftext|>\n".
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] in ['user', 'human'] -%}"
    "{{ 'USER: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] in ['assistant', 'gpt'] -%}"
    "{{ 'ASSISTANT: ' + message['content'] + '<|endoftext|>' + '\\n' }}"
    "{%- else -%}"
    "{{ raise_exception('unknown role ' + message['role'] + '; use user/human or assistant/gpt') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT: ' }}{%- endif -%}"
)


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on `texts`, with pad/eos/`<image>` special tokens and our chat template.

    The role prefixes "USER: " and "ASSISTANT: " are whole added tokens, so an answer tokenizes the
    same after the generation prompt as inside a full conversation (no stray trailing-space token).
    """
    special_tokens = [PAD_TOKEN, EOS_TOKEN, IMAGE_TOKEN]
    role_tokens = [AddedToken(prefix, normalized=False) for prefix in (USER_PREFIX, ASSISTANT_PREFIX)]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    num_fixed = len(alphabet) + len(special_tokens) + len(role_tokens)
    if vocab_size < num_fixed:
        raise ValueError(f"vocab_size={vocab_size} is below the {num_fixed} bytes, special and role tokens")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(role_tokens),
        special_tokens=special_tokens,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.add_tokens(role_tokens)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token=PAD_TOKEN, eos_token=EOS_TOKEN, image_token=IMAGE_TOKEN
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | os.PathLike) -> None:
    """Write tokenizer.json, its config and the chat template to `directory`."""
    tokenizer.save_pretrained(directory)


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """Load a tokenizer from a local folder (ours or a real LLM's); never touches the network."""
    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def add_image_token(tokenizer: PreTrainedTokenizerFast) -> int:
    """Add `<image>` as a never-split special token if missing, pad with eos if unset; return its id."""
    if IMAGE_TOKEN not in tokenizer.get_added_vocab():
        tokenizer.add_special_tokens({"extra_special_tokens": [IMAGE_TOKEN]}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def texts_from_llava_json(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Every conversation value of the LLaVA JSON files, with `<image>` (and its newline) removed."""
    for path in paths:
        with open(path) as f:
            records = json.load(f)
        for record in records:
            for turn in record["conversations"]:
                yield turn["value"].replace(f"{IMAGE_TOKEN}\n", "").replace(IMAGE_TOKEN, "")
