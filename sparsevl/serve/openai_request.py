"""OpenAI chat-completion requests -> what the scheduler needs (prompt ids, pixels, sampling settings), with
every refusal an `ApiError` in OpenAI's error shape that names the parameter at fault.

Prompt layout: the conversation goes through the checkpoint's chat template; a message's images come first,
as `<image>` placeholders before its text (LLaVA's layout), and system messages are prepended to the first
user message. Images arrive inline as `data:` URLs only: this server never fetches a URL.
"""

import base64
import binascii
import json
import re
from dataclasses import dataclass

import torch

from sparsevl.data.conversation import IMAGE_TOKEN, prompt_ids
from sparsevl.serve.assistant import UploadError, open_upload
from sparsevl.serve.sampling import SamplingParams

# Parameters accepted only at their neutral value (anything else would be silently ignored otherwise).
NEUTRAL = {"n": (1,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (False,)}
SUPPORTED = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
             "stream", "stream_options", "user"}
DATA_URL = re.compile(r"data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+(=[\w.+-]+)?)*),(?P<data>.*)", re.S)


class ApiError(Exception):
    """A refused request: HTTP status and OpenAI's `{"error": {message, type, param, code}}` body."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.kind = status, message, code, param, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    max_images: int = 1  # images per request
    max_image_bytes: int = 10 * 2**20  # decoded bytes per image
    max_image_pixels: int = 4096 * 4096  # width x height per image
    default_max_tokens: int = 64  # answer length when the request names none


@dataclass
class ChatRequest:
    input_ids: list[int]
    pixel_values: torch.Tensor | None  # (images, channels, height, width)
    params: SamplingParams
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk carries the usage


def parse_chat_request(body: bytes, *, model_id: str, tokenizer, image_processor, context: int,
                       num_image_tokens: int, limits: Limits) -> ChatRequest:
    """Validate a /v1/chat/completions body; ApiError (4xx) naming what is wrong."""
    request = _json_object(body)
    _check_parameters(request, model_id)
    turns, images = _conversation(request.get("messages"), limits)
    params = _sampling(request, limits)
    history = [{"from": "human" if role == "user" else "gpt", "value": text} for role, text in turns[:-1]]
    ids = prompt_ids(turns[-1][1], tokenizer, template="chat", history=history)
    length = len(ids) + len(images) * (num_image_tokens - 1) + params.max_tokens
    if length > context:
        raise ApiError(400, f"the prompt ({len(ids) - len(images)} text tokens and {len(images)} image(s) of "
                            f"{num_image_tokens} visual tokens) plus max_tokens {params.max_tokens} is {length} "
                            f"tokens, more than the model's context of {context}",
                       code="context_length_exceeded", param="messages")
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"] if images else None
    stream = _typed(request, "stream", bool, False)
    options = _typed(request, "stream_options", dict, {})
    if options and not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError(400, "stream_options.include_usage must be a boolean", param="stream_options")
    return ChatRequest(ids, pixels, params, stream, include_usage)


def _json_object(body: bytes) -> dict:
    try:
        request = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(request, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(request).__name__}",
                       code="invalid_json")
    return request


def _check_parameters(request: dict, model_id: str) -> None:
    for key, value in request.items():
        if key in SUPPORTED or value is None:
            continue
        if any(value == neutral and type(value) is type(neutral) for neutral in NEUTRAL.get(key, ())):
            continue
        hint = f" (only {NEUTRAL[key][0]!r} is supported)" if key in NEUTRAL else ""
        raise ApiError(400, f"unsupported parameter {key!r}{hint}", code="unsupported_parameter", param=key)
    model = request.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {model_id!r}",
                       code="model_not_found", param="model")


def _conversation(messages, limits: Limits) -> tuple[list[tuple[str, str]], list]:
    """[(role, text)] alternating user/assistant and ending with a user turn, and the decoded images."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    turns, images, system = [], [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"{where} must be an object whose role is system, user or assistant", param=where)
        role = message["role"]
        texts, message_images = _content(message.get("content"), where, allow_images=role == "user",
                                         images_before=len(images), limits=limits)
        images += message_images
        text = IMAGE_TOKEN * len(message_images) + ("\n" if message_images else "") + "\n".join(texts)
        if role == "system":
            system.append("\n".join(texts))
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise ApiError(400, f"{where} is a {role} message; after system messages, messages must alternate "
                                "user, assistant, user, ... and end with a user message", param=where)
        turns.append((role, text))
    if not turns or turns[-1][0] != "user":
        raise ApiError(400, "the last message must be a user message", param="messages")
    if system:
        turns[0] = ("user", "\n".join(system + [turns[0][1]]))
    return turns, images


def _content(content, where: str, *, allow_images: bool, images_before: int, limits: Limits) -> tuple[list, list]:
    """(texts, images) of one message's content: a string, or a list of text and image_url parts."""
    if isinstance(content, str):
        content = [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ApiError(400, f"{where}.content must be a string or a list of parts", param=f"{where}.content")
    texts, images = [], []
    for number, part in enumerate(content):
        name = f"{where}.content[{number}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            if IMAGE_TOKEN in part["text"]:
                raise ApiError(400, f"{name}: the text may not contain {IMAGE_TOKEN}; send images as image_url "
                                    "parts", param=name)
            texts.append(part["text"])
        elif kind == "image_url" and allow_images:
            if images_before + len(images) >= limits.max_images:
                raise ApiError(400, f"{name}: too many images; this server takes at most {limits.max_images} "
                                    "per request", code="too_many_images", param=name)
            url = part.get("image_url")
            images.append(_image(url.get("url") if isinstance(url, dict) else url, name, limits))
        elif kind == "image_url":
            raise ApiError(400, f"{name}: only user messages may hold images", param=name)
        else:
            raise ApiError(400, f"{name} must be {{type: text, text}} or {{type: image_url, image_url: {{url}}}}",
                           param=name)
    return texts, images


def _image(url, name: str, limits: Limits):
    """A PIL image from a `data:image/...;base64,` URL; ApiError for anything else."""
    if not isinstance(url, str):
        raise ApiError(400, f"{name}: image_url.url must be a string", param=name)
    if not url.startswith("data:"):
        raise ApiError(400, f"{name}: this server does not fetch remote images ({url[:40]!r}); send the image "
                            "inline as a data URL (data:image/png;base64,...)", code="remote_image_refused",
                       param=name)
    match = DATA_URL.fullmatch(url)
    if match is None or not (match["mime"] or "").startswith("image/") or ";base64" not in match["params"]:
        raise ApiError(400, f"{name}: expected a data URL of the form data:image/<type>;base64,<data>",
                       code="invalid_image", param=name)
    if len(match["data"]) > 4 * limits.max_image_bytes // 3 + 4:
        raise ApiError(413, f"{name}: the image is larger than {limits.max_image_bytes / 2**20:g} MB",
                       code="image_too_large", param=name)
    try:
        data = base64.b64decode(match["data"], validate=True)
    except (binascii.Error, ValueError) as error:
        raise ApiError(400, f"{name}: the data URL is not valid base64 ({error})", code="invalid_image",
                       param=name) from None
    try:
        return open_upload(data, max_bytes=limits.max_image_bytes, max_pixels=limits.max_image_pixels, name=name)
    except UploadError as error:
        raise ApiError(400, str(error), code="invalid_image", param=name) from None


def _sampling(request: dict, limits: Limits) -> SamplingParams:
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    key = "max_completion_tokens" if request.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = limits.default_max_tokens if max_tokens is None else max_tokens
    if type(max_tokens) is not int or max_tokens < 1:
        raise ApiError(400, f"{key} must be an integer >= 1, got {max_tokens!r}", param=key)
    temperature = _number(request, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(request, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise ApiError(400, "top_p must be in (0, 1]", param="top_p")
    seed = request.get("seed")
    if seed is not None and type(seed) is not int:
        raise ApiError(400, f"seed must be an integer, got {seed!r}", param="seed")
    stop = request.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of at most 4 of them", param="stop")
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=stop)


def _number(request: dict, key: str, default: float, low: float, high: float) -> float:
    value = request.get(key)
    if value is None:
        return default
    if type(value) not in (int, float) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number in [{low:g}, {high:g}], got {value!r}", param=key)
    return float(value)


def _typed(request: dict, key: str, kind: type, default):
    value = request.get(key)
    if value is None:
        return default
    if not isinstance(value, kind):
        raise ApiError(400, f"{key} must be a {kind.__name__}", param=key)
    return value
