"""The API's scheduler in a child process (as vLLM's engine core), so that HTTP handling and request parsing
in the server process do not take turns with decoding for one GIL.

The child loads the checkpoint with its inference flags, runs a `Scheduler`, and talks to the parent over
one pipe:

    parent -> child  ("submit", id, input_ids, pixels (numpy) or None, params, text_events), ("cancel", id),
                     ("close",)
    child -> parent  ("ready", context, num_image_tokens) or ("failed", error type, message), once;
                     then ("event", id, Delta | Finished); ("closed",) after a close

Text pieces cross the pipe only for requests that stream. The child ignores SIGINT and SIGTERM: the parent
decides when it stops (a close finishes every queued and running request first), and it stops by itself
when the parent is gone (its end of the pipe closes).
"""

import itertools
import logging
import multiprocessing
import signal
import threading
from pathlib import Path

import torch

from sparsevl.serve.scheduler import Finished, GenerationRequest, QueueFull, Scheduler, check_options, emit

logger = logging.getLogger(__name__)


def model_limits(model) -> tuple[int, int]:
    """(context length of the LLM, visual tokens per image) of a loaded model."""
    context = getattr(model.llm.config, "max_position_embeddings", None) or 10**9
    return context, model.num_image_tokens


class EngineProcess:
    """A Scheduler in a spawned child process; `submit`, `cancel` and `close` as the Scheduler's, from any thread.

    At most `max_batch_size + max_queue` requests are outstanding (decoding or waiting); one more gets
    QueueFull. Also loads the checkpoint's tokenizer and image processor here, for parsing requests. As with
    any spawned process, a script that makes one needs an `if __name__ == "__main__":` guard."""

    def __init__(self, model_dir: str | Path, inference_args, *, max_batch_size: int = 16, max_queue: int = 64,
                 batch_wait_ms: float = 0.0):
        from transformers import AutoImageProcessor

        from sparsevl.data.tokenizer import load_tokenizer

        check_options(max_batch_size, max_queue, batch_wait_ms)  # before spending seconds on a child
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        spawn = multiprocessing.get_context("spawn")
        self._conn, child_end = spawn.Pipe()
        options = {"max_batch_size": max_batch_size, "max_queue": max_queue + max_batch_size,
                   "batch_wait_ms": batch_wait_ms}
        self._process = spawn.Process(target=_child_main, args=(child_end, str(model_dir), inference_args, options),
                                      name="sparsevl-engine", daemon=True)
        self._process.start()
        child_end.close()
        try:
            self.tokenizer = load_tokenizer(model_dir)  # while the child loads the model
            self.image_processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
        except BaseException:
            self._process.kill()
            raise
        self.context, self.num_image_tokens = self._wait_until_ready()
        self._requests: dict[int, GenerationRequest] = {}  # outstanding, by id
        self._ids = itertools.count()
        self._lock = threading.Lock()  # guards _requests and _refusal
        self._send_lock = threading.Lock()  # one message on the pipe at a time (never held with _lock)
        self._refusal: str | None = None  # why new requests are refused: closing, or the child is gone
        self._reader = threading.Thread(target=self._read, name="sparsevl-engine-reader", daemon=True)

    def _wait_until_ready(self) -> tuple[int, int]:
        try:
            message = self._conn.recv()
        except EOFError:
            self._process.join()
            raise RuntimeError(f"the engine process exited with {self._process.exitcode} while loading the "
                               "model") from None
        if message[0] == "failed":
            self._process.join()
            _, kind, text = message
            raise {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}.get(kind, RuntimeError)(text)
        return message[1], message[2]

    @property
    def num_outstanding(self) -> int:
        """Requests submitted and not finished (decoding or waiting)."""
        return len(self._requests)

    def start(self) -> "EngineProcess":
        """Start delivering the child's events (once; later calls do nothing)."""
        if self._reader.ident is None:
            self._reader.start()
        return self

    def submit(self, request: GenerationRequest) -> None:
        """Send a request to the child; QueueFull when too many are outstanding, RuntimeError once closing."""
        pixels = None if request.pixel_values is None else request.pixel_values.numpy()
        with self._lock:
            if self._refusal is not None:
                raise RuntimeError(self._refusal)
            if len(self._requests) >= self.max_batch_size + self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting, {self.max_batch_size} "
                                "decoding)")
            key = next(self._ids)
            self._requests[key] = request
        self._send(("submit", key, request.input_ids, pixels, request.params, request.text_events))

    def cancel(self, request: GenerationRequest) -> None:
        """Let `request` leave at the child's next token boundary (a no-op once it has finished)."""
        request.cancelled.set()
        with self._lock:
            key = next((key for key, value in self._requests.items() if value is request), None)
        if key is not None:
            self._send(("cancel", key))

    def close(self, timeout: float | None = None) -> None:
        """Finish every outstanding request, then stop the child."""
        with self._lock:
            refusal, self._refusal = self._refusal, self._refusal or "the scheduler is shutting down"
        if refusal is None:
            self._send(("close",))
        if self._reader.ident is None:
            self._reader.start()  # delivers the last events, then sees "closed"
        self._reader.join(timeout)
        self._process.join(timeout)

    def _send(self, message: tuple) -> None:
        with self._send_lock:
            try:
                self._conn.send(message)
            except OSError:
                pass  # the child is gone: the reader fails what is outstanding

    def _read(self) -> None:
        """Hand the child's events to their requests until it closes or dies; then fail what is left."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            if message[0] == "closed":
                break
            _, key, event = message
            with self._lock:
                request = self._requests.pop(key) if isinstance(event, Finished) else self._requests.get(key)
            if request is not None:
                emit(request, event)
        self._process.join(5)
        gone = f"the engine process exited with {self._process.exitcode}; restart the server"
        with self._lock:
            self._refusal, left = self._refusal or gone, list(self._requests.values())
            self._requests.clear()
        if left:
            logger.error("%s (%d requests failed)", gone, len(left))
        for request in left:
            emit(request, Finished("", [], "error", error=f"generation failed: {gone}"))


def _child_main(conn, model_dir: str, inference_args, options: dict) -> None:
    """The child: load, report ready, then serve the parent's messages until it closes or goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.inference_flags import apply_inference_flags
    from sparsevl.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        model, tokenizer, _ = load_for_inference(model_dir)
        apply_inference_flags(inference_args, model)
        scheduler = Scheduler(model, tokenizer, **options).start()
    except Exception as error:  # reported to the parent, which raises it
        conn.send(("failed", type(error).__name__, str(error)))
        return
    conn.send(("ready", *model_limits(model)))
    send_lock, requests = threading.Lock(), {}

    def forward(key: int, event) -> None:
        if isinstance(event, Finished):
            requests.pop(key, None)
        with send_lock:
            conn.send(("event", key, event))

    while True:
        try:
            message = conn.recv()
        except EOFError:  # the parent is gone: nobody waits for the answers
            for request in list(requests.values()):
                request.cancelled.set()
            break
        if message[0] == "close":
            break
        if message[0] == "cancel":
            if (request := requests.get(message[1])) is not None:
                request.cancelled.set()
            continue
        _, key, input_ids, pixels, params, text_events = message
        request = GenerationRequest(input_ids, None if pixels is None else torch.from_numpy(pixels), params,
                                    lambda event, key=key: forward(key, event), text_events=text_events)
        requests[key] = request
        try:
            scheduler.submit(request)
        except (QueueFull, RuntimeError) as error:
            forward(key, Finished("", [], "error", error=f"generation failed: {error}"))
    scheduler.close()
    with send_lock:
        try:
            conn.send(("closed",))
        except OSError:
            pass
