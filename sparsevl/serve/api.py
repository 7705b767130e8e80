"""`sparsevl api --model DIR`: an OpenAI-compatible HTTP API (GET /v1/models, POST /v1/chat/completions,
plain or streamed as server-sent events) over the batching scheduler, so that OpenAI clients and harnesses
such as lmms-eval's `openai_compatible` model can use a sparse model with its pruning settings.

Binds 127.0.0.1 unless --host says otherwise; --api_key requires `Authorization: Bearer KEY`. Images come
inline as data: URLs (never fetched). Refused requests get OpenAI's error shape and a 4xx status; a full
queue gets 429. SIGTERM stops accepting connections, finishes the requests in flight, then exits.

The model decodes in a child process by default (--engine process, as vLLM's engine core): this process
parses requests and speaks HTTP without taking turns with decoding for one GIL. --engine thread keeps
everything in one process.
"""

import argparse
import asyncio
import hmac
import json
import sys
import time
import uuid
from collections.abc import Callable

from sparsevl.model.inference_flags import add_inference_flags
from sparsevl.serve.engine_process import EngineProcess, model_limits
from sparsevl.serve.openai_request import ApiError, Limits, parse_chat_request
from sparsevl.serve.scheduler import Delta, Finished, GenerationRequest, QueueFull, Scheduler


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sparsevl api", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="sparsevl checkpoint directory")
    p.add_argument("--model_name", default=None, help="model id clients send (default: the folder's name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; anything but loopback exposes the API")
    p.add_argument("--port", type=int, default=8000, help="TCP port to listen on")
    p.add_argument("--api_key", default=None, help="require `Authorization: Bearer API_KEY` (401 otherwise)")
    p.add_argument("--engine", choices=("process", "thread"), default="process",
                   help="where the model decodes: a child process (default; HTTP and parsing stay out of its "
                        "way) or a thread of this process (one process, slower under load)")
    p.add_argument("--max_batch_size", type=int, default=16, help="most requests decoded together")
    p.add_argument("--max_queue", type=int, default=64, help="requests waiting beyond this get 429")
    p.add_argument("--batch_wait_ms", type=float, default=50.0,
                   help="while rows decode, arrivals that cannot fill the batch wait up to this long to be "
                        "prefilled together (an idle server starts at once)")
    p.add_argument("--max_body_mb", type=float, default=20.0, help="largest request body in MB (413 beyond)")
    p.add_argument("--max_images", type=int, default=1, help="most images per request")
    p.add_argument("--max_image_mb", type=float, default=10.0, help="largest decoded image in MB")
    p.add_argument("--max_image_pixels", type=int, default=4096 * 4096, help="largest image, width x height")
    p.add_argument("--default_max_tokens", type=int, default=64, help="answer length when a request names none")
    add_inference_flags(p)
    return p


class ApiServer:
    """What the routes need: the engine (a Scheduler, or one in a child process), the checkpoint's tokenizer,
    image processor, context length and visual tokens per image, and the limits."""

    def __init__(self, engine: Scheduler | EngineProcess, tokenizer, image_processor, *, context: int,
                 num_image_tokens: int, model_id: str, limits: Limits, max_body_bytes: int,
                 api_key: str | None = None):
        self.engine, self.tokenizer, self.image_processor = engine, tokenizer, image_processor
        self.context, self.num_image_tokens = context, num_image_tokens
        self.model_id, self.limits, self.max_body_bytes, self.api_key = model_id, limits, max_body_bytes, api_key

    def authorize(self, request) -> None:
        if self.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                           code="invalid_api_key")

    async def read_body(self, request) -> bytes:
        """The body, refused with 413 as soon as it passes --max_body_mb."""
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            raise ApiError(413, f"the request body is larger than {self.max_body_bytes / 2**20:g} MB "
                                "(--max_body_mb)", code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"the request body is larger than {self.max_body_bytes / 2**20:g} MB "
                                    "(--max_body_mb)", code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def parse(self, body: bytes):
        return parse_chat_request(body, model_id=self.model_id, tokenizer=self.tokenizer,
                                  image_processor=self.image_processor, context=self.context,
                                  num_image_tokens=self.num_image_tokens, limits=self.limits)

    def submit(self, chat) -> tuple[asyncio.Queue, GenerationRequest]:
        """Queue the parsed request; its events arrive on the returned asyncio queue."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        request = GenerationRequest(chat.input_ids, chat.pixel_values, chat.params,
                                    lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
                                    text_events=chat.stream)
        try:
            self.engine.submit(request)
        except QueueFull as error:
            raise ApiError(429, f"the server is busy: {error}; retry later", code="rate_limit_exceeded",
                           kind="rate_limit_error") from None
        except RuntimeError as error:  # closing, or the engine process is gone
            raise ApiError(503, str(error), code="unavailable", kind="server_error") from None
        return events, request


def usage(done: Finished) -> dict:
    """OpenAI's usage counts (prompt tokens include the visual tokens entering the LLM; eos is not counted),
    plus the visual tokens entering the LLM and those its last layer kept."""
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": len(done.token_ids),
            "total_tokens": done.prompt_tokens + len(done.token_ids), "visual_tokens": done.visual_tokens,
            "visual_tokens_kept": done.visual_tokens_kept}


def completion(done: Finished, completion_id: str, model_id: str) -> dict:
    return {"id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_id,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done.text},
                         "finish_reason": done.finish_reason, "logprobs": None}],
            "usage": usage(done)}


def chunk(completion_id: str, model_id: str, delta: dict | None, finish_reason: str | None = None,
          usage_counts: dict | None = None) -> str:
    """One server-sent event in OpenAI's chunk format (delta None: the usage-only last chunk)."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model_id, "choices": choices, **({"usage": usage_counts} if usage_counts else {})}
    return f"data: {json.dumps(body)}\n\n"


def build_app(server: ApiServer):
    """The Starlette app (not started); the lifespan drains the engine on shutdown."""
    from contextlib import asynccontextmanager

    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    async def models(request):
        server.authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                                         "owned_by": "sparsevl"}]})

    async def chat_completions(request):
        server.authorize(request)
        chat = await run_in_threadpool(server.parse, await server.read_body(request))
        events, generation = server.submit(chat)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(stream_events(events, lambda: server.engine.cancel(generation), completion_id,
                                                   server.model_id, chat.include_usage),
                                     media_type="text/event-stream")
        try:
            event = await events.get()  # the only event: a request that does not stream gets no text pieces
        finally:
            server.engine.cancel(generation)  # no-op once finished; stops the row if this client went away
        if event.finish_reason == "error":
            raise ApiError(500, event.error, code="generation_failed", kind="server_error")
        return JSONResponse(completion(event, completion_id, server.model_id))

    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), status_code=error.status)

    async def http_error(request, error: HTTPException):
        return JSONResponse(ApiError(error.status_code, f"{request.method} {request.url.path}: {error.detail}",
                                     code="not_found" if error.status_code == 404 else None).body(),
                            status_code=error.status_code)

    async def server_error(request, error: Exception):
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}", kind="server_error").body(),
                            status_code=500)

    @asynccontextmanager
    async def lifespan(app):
        server.engine.start()
        yield
        await run_in_threadpool(server.engine.close)

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"])]
    return Starlette(routes=routes, lifespan=lifespan,
                     exception_handlers={ApiError: api_error, HTTPException: http_error, Exception: server_error})


async def stream_events(events: asyncio.Queue, cancel: Callable[[], None], completion_id: str, model_id: str,
                        include_usage: bool):
    """Server-sent events: a role chunk, one chunk per text piece, the finish chunk, usage if asked, [DONE]."""
    try:
        yield chunk(completion_id, model_id, {"role": "assistant", "content": ""})
        while isinstance(event := await events.get(), Delta):
            yield chunk(completion_id, model_id, {"content": event.text})
        if event.finish_reason == "error":
            yield f"data: {json.dumps(ApiError(500, event.error, kind='server_error').body())}\n\n"
        else:
            yield chunk(completion_id, model_id, {}, event.finish_reason)
            if include_usage:
                yield chunk(completion_id, model_id, None, usage_counts=usage(event))
        yield "data: [DONE]\n\n"
    finally:
        cancel()  # a client that disconnects mid-stream frees its row at the next step


def build_server(args) -> ApiServer:
    """Load the checkpoint with its pruning flags (in a child process with --engine process) and wire the engine
    and limits (ValueError on bad flags)."""
    from pathlib import Path

    from sparsevl.serve.assistant import VisionAssistant

    _check_limits(args)
    options = {"max_batch_size": args.max_batch_size, "max_queue": args.max_queue, "batch_wait_ms": args.batch_wait_ms}
    if args.engine == "process":
        engine = EngineProcess(args.model, args, **options)
        tokenizer, image_processor = engine.tokenizer, engine.image_processor
        context, num_image_tokens = engine.context, engine.num_image_tokens
    else:
        assistant = VisionAssistant.load(args.model, args, **options)
        engine, tokenizer, image_processor = assistant.scheduler, assistant.tokenizer, assistant.image_processor
        context, num_image_tokens = model_limits(assistant.model)
    limits = Limits(max_images=args.max_images, max_image_bytes=int(args.max_image_mb * 2**20),
                    max_image_pixels=args.max_image_pixels, default_max_tokens=args.default_max_tokens)
    return ApiServer(engine, tokenizer, image_processor, context=context, num_image_tokens=num_image_tokens,
                     limits=limits, api_key=args.api_key, model_id=args.model_name or Path(args.model).resolve().name,
                     max_body_bytes=int(args.max_body_mb * 2**20))


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    import uvicorn

    from sparsevl.serve.web import is_loopback

    try:
        server = build_server(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"sparsevl api: {error}", file=sys.stderr)
        return 2
    if not is_loopback(args.host):
        print(f"sparsevl api: WARNING listening on {args.host}: the API is reachable from the network"
              + ("" if args.api_key else " and --api_key is not set"), file=sys.stderr)
    print(f"sparsevl api: serving {server.model_id!r} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(build_app(server), host=args.host, port=args.port, log_level="warning")
    return 0


def _check_limits(args) -> None:
    for flag in ("max_batch_size", "max_queue", "max_images", "max_image_pixels", "default_max_tokens"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    for flag in ("max_body_mb", "max_image_mb"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag} must be > 0, got {getattr(args, flag)}")
