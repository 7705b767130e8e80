"""`sparsevl api`: the official `openai` client (plain and streaming) against a real uvicorn server on
127.0.0.1 serving a tiny checkpoint; answers equal the model's own greedy generation one prompt at a time;
bad requests get 4xx in OpenAI's error shape while the server and concurrent requests carry on. The shared
server runs with each engine (the model in a child process, the default, and in a thread); servers made for
one front-end flag (limits, API key) use the thread engine, which starts faster and shares that code."""

import base64
import io
import json
import os
import signal
import socket
import threading
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
from PIL import Image

from sparsevl.data.conversation import prompt_ids
from sparsevl.eval.run import load_for_inference
from sparsevl.model.inference_flags import apply_inference_flags
from sparsevl.serve.api import build_app, build_server, parser
from sparsevl.serve.scheduler import Scheduler

QUESTIONS = ["what colour is the circle?", "how many shapes are there?", "is there a red square?",
             "where is the triangle?", "what shape is at the top left?", "count them"]


@contextmanager
def running_api(checkpoint, *flags):
    """A uvicorn server on a free 127.0.0.1 port in a thread; yields (base_url, ApiServer)."""
    import uvicorn

    server = build_server(parser().parse_args(["--model", str(checkpoint), *flags]))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        if uv.started:
            break
        threading.Event().wait(0.05)
    try:
        yield base, server
    finally:
        uv.should_exit = True
        thread.join(60)
        sock.close()


@pytest.fixture(scope="module", params=["process", "thread"])
def api(lively_checkpoint, request):
    with running_api(lively_checkpoint, "--engine", request.param, "--max_batch_size", "4") as served:
        yield served


@pytest.fixture(scope="module")
def reference(lively_checkpoint):
    """(model, tokenizer, image processor) of the served checkpoint, loaded here for the oracle."""
    return load_for_inference(lively_checkpoint)


@pytest.fixture(scope="module")
def images(shapes_dir):
    return [(shapes_dir / "images" / "test" / f"{i:06d}.png").read_bytes() for i in range(len(QUESTIONS))]


def data_url(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode()}"


def user_message(question: str, png: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": question},
                                         {"type": "image_url", "image_url": {"url": data_url(png)}}]}]


def oracle(reference, question: str, png: bytes, max_tokens: int) -> str:
    """The model's own greedy answer, one prompt at a time, no KV cache (as `sparsevl eval` decodes it)."""
    model, tokenizer, processor = reference
    ids = prompt_ids("<image>\n" + question, tokenizer)
    pixels = processor(images=[Image.open(io.BytesIO(png)).convert("RGB")], return_tensors="pt")["pixel_values"]
    tokens = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                            max_new_tokens=max_tokens, eos_token_id=tokenizer.eos_token_id, use_cache=False)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def client(base, key="unused"):
    return openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=120)


def test_models_lists_the_served_checkpoint(api, lively_checkpoint):
    base, server = api
    assert [m.id for m in client(base).models.list().data] == [lively_checkpoint.name] == [server.model_id]


def test_openai_client_plain_answer_equals_greedy_generation(api, images, reference):
    base, server = api
    reply = client(base).chat.completions.create(model=server.model_id, messages=user_message(QUESTIONS[0],
                                                 images[0]), max_tokens=10, temperature=0)
    expected = oracle(reference, QUESTIONS[0], images[0], 10)
    assert expected and reply.choices[0].message.content == expected
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.object == "chat.completion"
    text_tokens = len(prompt_ids("<image>\n" + QUESTIONS[0], server.tokenizer)) - 1
    assert reply.usage.prompt_tokens == text_tokens + 64 and reply.usage.visual_tokens == 64
    assert reply.usage.visual_tokens_kept == 64 and reply.usage.total_tokens == 64 + text_tokens + \
        reply.usage.completion_tokens


def test_openai_client_streams_the_same_answer_in_chunks(api, images, reference):
    base, server = api
    stream = client(base).chat.completions.create(model=server.model_id, messages=user_message(QUESTIONS[1],
                                                  images[1]), max_tokens=12, temperature=0, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == oracle(reference, QUESTIONS[1], images[1], 12)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed piece by piece
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.visual_tokens == 64


def test_sse_wire_format_ends_with_done(api, images):
    base, server = api
    body = {"model": server.model_id, "messages": user_message(QUESTIONS[2], images[2]), "max_tokens": 4,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_concurrent_clients_are_batched_and_answer_as_one_at_a_time(api, images, reference):
    base, server = api
    answers = [None] * len(QUESTIONS)
    start = len(server.engine.batch_sizes) if isinstance(server.engine, Scheduler) else None

    def ask(i):
        reply = client(base).chat.completions.create(model=server.model_id, max_tokens=6 + 2 * i, temperature=0,
                                                     messages=user_message(QUESTIONS[i], images[i]))
        answers[i] = reply.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert answers == [oracle(reference, q, png, 6 + 2 * i) for i, (q, png) in enumerate(zip(QUESTIONS, images))]
    if start is not None:  # the thread engine's scheduler is visible here: the requests were decoded together
        assert 1 < max(list(server.engine.batch_sizes)[start:]) <= 4


def test_sampling_follows_the_seed(api, images):
    base, server = api
    ask = lambda seed: client(base).chat.completions.create(  # noqa: E731
        model=server.model_id, messages=user_message(QUESTIONS[0], images[0]), max_tokens=8, temperature=1.2,
        top_p=0.95, seed=seed).choices[0].message.content
    assert ask(3) == ask(3)
    assert len({ask(seed) for seed in range(4)}) > 1


def test_stop_strings_cut_the_answer(api, images, reference):
    base, server = api
    full = oracle(reference, QUESTIONS[3], images[3], 12)
    word = full.split()[2]
    reply = client(base).chat.completions.create(model=server.model_id, messages=user_message(QUESTIONS[3],
                                                 images[3]), max_tokens=12, temperature=0, stop=[word, "zzzz"])
    assert reply.choices[0].message.content == full[: full.index(word)].strip()
    assert reply.choices[0].finish_reason == "stop"


def truncated_png(png: bytes) -> bytes:
    return png[: len(png) // 2]


def bad_bodies(model_id: str, png: bytes) -> dict:
    """name -> (body bytes, expected status, expected error code or param)."""
    def body(messages=None, **extra):
        return json.dumps({"model": model_id, "messages": messages or user_message("what?", png), **extra}).encode()

    image_part = lambda url: [{"role": "user", "content": [{"type": "text", "text": "what?"},  # noqa: E731
                                                           {"type": "image_url", "image_url": {"url": url}}]}]
    two_images = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}] * 2}]
    return {
        "malformed json": (b'{"model": "x", "messages": [', 400, "invalid_json"),
        "not an object": (b"[1, 2]", 400, "invalid_json"),
        "remote url": (body(image_part("https://example.com/cat.png")), 400, "remote_image_refused"),
        "non-image data url": (body(image_part("data:text/plain;base64,aGVsbG8=")), 400, "invalid_image"),
        "text bytes as png": (body(image_part(data_url(b"hello world"))), 400, "invalid_image"),
        "truncated png": (body(image_part(data_url(truncated_png(png)))), 400, "invalid_image"),
        "bad base64": (body(image_part("data:image/png;base64,@@@@")), 400, "invalid_image"),
        "too many images": (body(two_images), 400, "too_many_images"),
        "over-long prompt": (body([{"role": "user", "content": "shape " * 1100}]), 400, "context_length_exceeded"),
        "max_tokens past the context": (body(max_tokens=5000), 400, "context_length_exceeded"),
        "bad temperature": (body(temperature=-1), 400, "temperature"),
        "unsupported parameter": (body(logprobs=True), 400, "unsupported_parameter"),
        "n above one": (body(n=2), 400, "unsupported_parameter"),
        "wrong model": (json.dumps({"model": "gpt-4o", "messages": user_message("q", png)}).encode(), 404,
                        "model_not_found"),
        "assistant last": (body([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]), 400,
                           "messages"),
        "image placeholder in text": (body([{"role": "user", "content": "<image> what?"}]), 400,
                                      "messages[0].content[0]"),
    }


@pytest.mark.parametrize("case", list(bad_bodies("m", b"").keys()))
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(api, images, case, reference):
    base, server = api
    payload, status, code = bad_bodies(server.model_id, images[0])[case]
    response = httpx.post(f"{base}/chat/completions", content=payload, headers={"content-type": "application/json"},
                          timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert code in (error["code"], error["param"])
    reply = client(base).chat.completions.create(model=server.model_id, messages=user_message(QUESTIONS[0],
                                                 images[0]), max_tokens=3, temperature=0)
    assert reply.choices[0].message.content == oracle(reference, QUESTIONS[0], images[0], 3)


def test_body_limit_and_unknown_routes(lively_checkpoint, images):
    noise = io.BytesIO()
    Image.frombytes("RGB", (100, 100), torch.randint(0, 256, (100 * 100 * 3,), dtype=torch.uint8).numpy().tobytes()
                    ).save(noise, format="PNG")
    with running_api(lively_checkpoint, "--engine", "thread", "--max_body_mb", "0.01") as (base, server):
        big = json.dumps({"messages": user_message("q", noise.getvalue())}).encode()
        assert len(big) > 0.01 * 2**20
        response = httpx.post(f"{base}/chat/completions", content=big, timeout=60)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        missing = httpx.get(f"{base}/nowhere", timeout=60)
        assert missing.status_code == 404 and "error" in missing.json()


def test_bad_requests_alongside_valid_ones_leave_them_correct(api, images, reference):
    base, server = api
    bad = list(bad_bodies(server.model_id, images[0]).values())
    answers, statuses = [None] * 4, []

    def ask(i):
        answers[i] = client(base).chat.completions.create(
            model=server.model_id, messages=user_message(QUESTIONS[i], images[i]), max_tokens=10,
            temperature=0).choices[0].message.content

    def refuse(payload):
        statuses.append(httpx.post(f"{base}/chat/completions", content=payload, timeout=60).status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=refuse, args=(payload,)) for payload, _, _ in bad]
    for thread in sorted(threads, key=lambda t: hash(t.name)):
        thread.start()
    for thread in threads:
        thread.join(120)
    assert sorted(statuses) == sorted(status for _, status, _ in bad)
    assert answers == [oracle(reference, QUESTIONS[i], images[i], 10) for i in range(4)]


def test_api_key_is_required_when_set(lively_checkpoint, images):
    with running_api(lively_checkpoint, "--engine", "thread", "--api_key", "s3cret") as (base, server):
        assert httpx.get(f"{base}/models", timeout=60).status_code == 401
        wrong = httpx.get(f"{base}/models", headers={"Authorization": "Bearer nope"}, timeout=60)
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(base, key="nope").models.list()
        assert client(base, key="s3cret").models.list().data[0].id == server.model_id


def one_waits(server) -> bool:
    """Whether one request waits behind the one decoding (--max_batch_size 1)."""
    if isinstance(server.engine, Scheduler):
        return server.engine.num_waiting == 1
    return server.engine.num_outstanding == 2


@pytest.mark.parametrize("engine", ["process", "thread"])
def test_full_queue_gets_429(lively_checkpoint, images, engine):
    with running_api(lively_checkpoint, "--engine", engine, "--max_batch_size", "1", "--max_queue", "1") as (
            base, server):
        body = {"model": server.model_id, "messages": user_message(QUESTIONS[0], images[0]), "max_tokens": 400,
                "temperature": 1.0, "seed": 0, "stream": True, "stop": None}
        first = []
        with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=120) as running:
            lines = running.iter_lines()
            first.append(next(lines))  # the first request is decoding now
            queued = []
            waiting = threading.Thread(target=lambda: queued.append(httpx.post(
                f"{base}/chat/completions", timeout=120, json={**body, "stream": False, "max_tokens": 2})))
            waiting.start()
            for _ in range(200):
                if one_waits(server):
                    break
                threading.Event().wait(0.01)
            refused = httpx.post(f"{base}/chat/completions", json={**body, "stream": False}, timeout=60)
            rest = [line for line in lines if line]
        waiting.join(120)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert rest[-1] == "data: [DONE]" and len(rest) > 10  # the running request went on to its end
    assert queued[0].status_code == 200  # the queued one waited for its turn


def test_pruning_flags_reach_the_served_model(lively_checkpoint, images):
    flags = ["--token_pruner", "fastv", "--fastv_k", "1", "--fastv_ratio", "0.75"]
    pruned = load_for_inference(lively_checkpoint)
    apply_inference_flags(parser().parse_args(["--model", str(lively_checkpoint), *flags]), pruned[0])
    with running_api(lively_checkpoint, *flags) as (base, server):  # the default engine: flags cross to the child
        reply = client(base).chat.completions.create(model=server.model_id, max_tokens=8, temperature=0,
                                                     messages=user_message(QUESTIONS[0], images[0]))
    assert reply.choices[0].message.content == oracle(pruned, QUESTIONS[0], images[0], 8)
    assert reply.choices[0].message.content != oracle(load_for_inference(lively_checkpoint), QUESTIONS[0], images[0], 8)
    assert reply.usage.visual_tokens == 64 and reply.usage.visual_tokens_kept == 16


def test_image_count_size_and_default_length_flags(lively_checkpoint, images, reference):
    two = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png)}}
                                        for png in images[:2]] + [{"type": "text", "text": "compare"}]}]
    flags = ["--max_images", "2", "--default_max_tokens", "3", "--max_image_pixels", "5000"]
    with running_api(lively_checkpoint, "--engine", "thread", *flags) as (base, server):
        reply = client(base).chat.completions.create(model=server.model_id, messages=two, temperature=0)
        assert reply.usage.visual_tokens == 128 and reply.usage.completion_tokens <= 3
        default_length = client(base).chat.completions.create(model=server.model_id, temperature=0,
                                                              messages=user_message(QUESTIONS[0], images[0]))
        assert default_length.choices[0].message.content == oracle(reference, QUESTIONS[0], images[0], 3)
        big = io.BytesIO()
        Image.new("RGB", (80, 80), "red").save(big, format="PNG")  # 6400 pixels
        refused = httpx.post(f"{base}/chat/completions", json={"messages": user_message("q", big.getvalue())},
                             timeout=60)
        assert refused.status_code == 400 and "80x80 pixels; the limit is 5000" in refused.json()["error"]["message"]
    with running_api(lively_checkpoint, "--engine", "thread", "--max_image_mb", "0.0001") as (base, server):
        refused = httpx.post(f"{base}/chat/completions", json={"messages": user_message("q", images[0])}, timeout=60)
        assert refused.status_code == 413 and refused.json()["error"]["code"] == "image_too_large"


def test_api_binds_loopback_by_default():
    args = parser().parse_args(["--model", "m"])
    assert (args.host, args.port, args.api_key, args.max_batch_size, args.engine) == ("127.0.0.1", 8000, None, 16,
                                                                                       "process")


def test_batch_wait_flag_reaches_the_scheduler(lively_checkpoint):
    args = ["--model", str(lively_checkpoint), "--engine", "thread", "--batch_wait_ms", "35"]
    server = build_server(parser().parse_args(args))
    assert server.engine.batch_wait == 0.035
    server.engine.close()


def test_a_dead_engine_process_fails_its_requests_then_answers_503(lively_checkpoint, images):
    with running_api(lively_checkpoint, "--engine", "process") as (base, server):
        body = {"model": server.model_id, "messages": user_message(QUESTIONS[0], images[0]), "max_tokens": 400,
                "temperature": 1.0, "seed": 0, "stream": True}
        with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=120) as running:
            lines = running.iter_lines()
            next(lines)  # decoding has begun
            os.kill(server.engine._process.pid, signal.SIGKILL)
            rest = [line for line in lines if line]
        failed = json.loads(rest[-2][6:])["error"]
        assert rest[-1] == "data: [DONE]" and "engine process exited" in failed["message"]
        refused = httpx.post(f"{base}/chat/completions", json={**body, "stream": False}, timeout=60)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "unavailable"
        assert "restart the server" in refused.json()["error"]["message"]
        assert httpx.get(f"{base}/models", timeout=60).status_code == 200  # the API itself still answers
