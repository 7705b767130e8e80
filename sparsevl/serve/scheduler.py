"""One batching scheduler behind chat, the web demo and the API: a bounded queue of requests and one
thread that decodes them together with continuous batching at token boundaries.

Between two decode steps, waiting requests (up to `max_batch_size` rows in all) are prefilled as one
left-padded batch and join the running rows; every row then takes one token by its own sampling settings,
rows that finished (eos, a stop string, max_tokens, or cancelled by their client) leave the batch at once,
and the rest step on. Events (text pieces, then one `Finished`) go to each request's `on_event` callback,
called on the scheduler thread.
"""

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sparsevl.serve.answer_text import AnswerText
from sparsevl.serve.decode_rows import DecodeRows, PrefillInfo
from sparsevl.serve.sampling import SamplingParams, next_token

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The scheduler's queue holds `max_queue` waiting requests already."""


@dataclass
class Delta:
    text: str  # the next piece of the answer


@dataclass
class Finished:
    text: str  # the whole answer (up to a stop string, stripped)
    token_ids: list[int]  # generated tokens, eos excluded
    finish_reason: str  # "stop" (eos or stop string), "length" (max_tokens), "cancelled", "error"
    prompt_tokens: int = 0  # merged prompt length in the LLM: text plus visual tokens
    visual_tokens: int = 0  # visual tokens entering the LLM
    visual_tokens_kept: int = 0  # visual tokens the LLM's last layer attends to
    visual_positions: list[int] = field(default_factory=list)  # prompt positions of the visual tokens
    kept_positions: list[int] | None = None  # prompt positions kept by pruning inside the LLM (None: no pruning)
    error: str | None = None


@dataclass
class GenerationRequest:
    input_ids: list[int]  # prompt token ids with one image placeholder per image
    pixel_values: torch.Tensor | None  # (images, channels, height, width) in placeholder order
    params: SamplingParams
    on_event: Callable[[Delta | Finished], None]
    cancelled: threading.Event = field(default_factory=threading.Event)  # set by the client to leave early
    text_events: bool = True  # False: no Delta events, only the Finished one (a client that does not stream)
    arrived: float = 0.0  # time.monotonic() when submitted


class _Row:
    """A request being decoded."""

    def __init__(self, request: GenerationRequest, tokenizer, info: PrefillInfo, index: int):
        self.request, self.params = request, request.params
        self.answer = AnswerText(tokenizer, request.params.stop)
        self.generator = request.params.generator()
        self.tokens: list[int] = []
        self.usage = {"prompt_tokens": info.prompt_tokens[index], "visual_tokens": info.visual_tokens[index],
                      "visual_tokens_kept": info.visual_tokens_kept[index],
                      "visual_positions": info.visual_positions[index],
                      "kept_positions": None if info.kept_positions is None else info.kept_positions[index]}


def check_options(max_batch_size: int, max_queue: int, batch_wait_ms: float) -> None:
    """ValueError naming the flags unless max_batch_size >= 1, max_queue >= 1 and batch_wait_ms >= 0."""
    if max_batch_size < 1 or max_queue < 1 or batch_wait_ms < 0:
        raise ValueError(f"--max_batch_size and --max_queue must be >= 1 and --batch_wait_ms >= 0, got "
                         f"{max_batch_size}, {max_queue}, {batch_wait_ms}")


class Scheduler:
    """Decode queued requests in one thread; `submit` from any thread."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 batch_wait_ms: float = 0.0):
        check_options(max_batch_size, max_queue, batch_wait_ms)
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_batch_size, self.max_queue, self.batch_wait = max_batch_size, max_queue, batch_wait_ms / 1000
        self._waiting: deque[GenerationRequest] = deque()
        self._changed = threading.Condition()  # guards _waiting and _closing; notified on submit and close
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="sparsevl-scheduler", daemon=True)
        # recent history, read by tests and benchmarks: rows decoded together per step, requests per prefill
        self.batch_sizes: deque[int] = deque(maxlen=100_000)
        self.prefill_sizes: deque[int] = deque(maxlen=100_000)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> "Scheduler":
        """Start the decoding thread (once; later calls do nothing)."""
        if self._thread.ident is None:
            self._thread.start()
        return self

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; QueueFull when `max_queue` requests wait already, RuntimeError once closing."""
        with self._changed:
            if self._closing:
                raise RuntimeError("the scheduler is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            request.arrived = time.monotonic()
            self._waiting.append(request)
            self._changed.notify()

    def cancel(self, request: GenerationRequest) -> None:
        """Let `request` leave at the next token boundary (a no-op once it has finished)."""
        request.cancelled.set()

    def close(self, timeout: float | None = None) -> None:
        """Finish every queued and running request, then stop the thread."""
        with self._changed:
            self._closing = True
            self._changed.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def generate(self, input_ids: list[int], pixel_values: torch.Tensor | None, params: SamplingParams,
                 on_text: Callable[[str], None] | None = None) -> Finished:
        """Submit and wait (from a thread other than the scheduler's); `on_text` sees each piece of the answer."""
        events: queue.Queue = queue.Queue()
        self.submit(GenerationRequest(input_ids, pixel_values, params, events.put))
        while True:
            event = events.get()
            if isinstance(event, Finished):
                return event
            if on_text is not None:
                on_text(event.text)

    def _run(self) -> None:
        rows, running, logits = None, [], None
        while True:
            new = self._take(room=self.max_batch_size - len(running), block=not running)
            if new is None:
                return
            if new:
                rows, logits = self._admit(new, rows, logits, running)
            if not running:
                continue
            self.batch_sizes.append(len(running))
            try:
                rows, logits = self._decode_step(rows, logits, running)
            except Exception as error:  # a failing step fails its rows; the scheduler keeps serving
                logger.exception("decode step failed")
                for row in running:
                    emit(row.request, Finished("", row.tokens, "error", error=f"generation failed: {error}"))
                rows, logits = None, None
                running.clear()

    def _take(self, *, room: int, block: bool) -> list[GenerationRequest] | None:
        """Up to `room` waiting requests; blocks while idle; None once closing with nothing left to do.

        An idle scheduler takes what waits at once. While rows run (`block` False), waiting requests join once
        the oldest has waited `batch_wait` (meanwhile the rows keep decoding, and short answers often finish
        first, leaving the scheduler idle): one prefill of many requests costs much less than many of a few."""
        with self._changed:
            while block and not self._waiting and not self._closing:
                self._changed.wait()
            if block and not self._waiting:
                return None
            if (not block and not self._closing and self._waiting
                    and time.monotonic() - self._waiting[0].arrived < self.batch_wait):
                return []
            taken = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
        for request in [r for r in taken if r.cancelled.is_set()]:
            emit(request, Finished("", [], "cancelled"))
        return [r for r in taken if not r.cancelled.is_set()]

    def _admit(self, new: list[GenerationRequest], rows: DecodeRows | None, logits: torch.Tensor | None,
               running: list[_Row]) -> tuple[DecodeRows | None, torch.Tensor | None]:
        """Prefill `new` as one batch and append its rows to the running ones (or fail them, alone)."""
        self.prefill_sizes.append(len(new))
        try:
            new_rows, new_logits, info = DecodeRows.prefill(self.model, *self._prompt_batch(new))
        except Exception as error:
            logger.exception("prefill failed")
            for request in new:
                emit(request, Finished("", [], "error", error=f"generation failed: {error}"))
            return rows, logits
        running += [_Row(request, self.tokenizer, info, i) for i, request in enumerate(new)]
        if rows is None:
            return new_rows, new_logits
        rows.extend(new_rows)
        return rows, torch.cat([logits, new_logits])

    def _prompt_batch(self, requests: list[GenerationRequest]):
        """(input_ids right-padded, attention_mask, pixel_values or None) of the requests, in order."""
        longest = max(len(r.input_ids) for r in requests)
        input_ids = torch.full((len(requests), longest), self.tokenizer.pad_token_id or 0)
        attention_mask = torch.zeros((len(requests), longest), dtype=torch.long)
        for i, request in enumerate(requests):
            input_ids[i, : len(request.input_ids)] = torch.tensor(request.input_ids)
            attention_mask[i, : len(request.input_ids)] = 1
        pixels = [r.pixel_values for r in requests if r.pixel_values is not None and len(r.pixel_values)]
        return input_ids, attention_mask, torch.cat(pixels) if pixels else None

    def _decode_step(self, rows: DecodeRows, logits: torch.Tensor, running: list[_Row]
                     ) -> tuple[DecodeRows | None, torch.Tensor | None]:
        """Every row takes its next token; finished rows leave; the rest run one step."""
        tokens, staying = [], []
        greedy = logits.argmax(-1).tolist()  # one call for all rows; sampled rows draw their own below
        for i, row in enumerate(running):
            token = greedy[i] if row.params.temperature == 0 else next_token(logits[i], row.params, row.generator)
            finish_reason = self._advance(row, token)
            if finish_reason is None:
                tokens.append(token)
                staying.append(i)
            else:
                rest = row.answer.finish()
                if rest and row.request.text_events:
                    emit(row.request, Delta(rest))
                emit(row.request, Finished(row.answer.text, row.tokens, finish_reason, **row.usage))
        if len(staying) < len(running):
            running[:] = [running[i] for i in staying]
            if not running:
                return None, None
            rows.select(staying)
        return rows, rows.step(torch.tensor(tokens))

    def _advance(self, row: _Row, token: int) -> str | None:
        """Record `token` for `row` and stream its text; the finish reason once the row is done."""
        if row.request.cancelled.is_set():
            return "cancelled"
        if token == self.tokenizer.eos_token_id:
            return "stop"
        row.tokens.append(token)
        piece = row.answer.push(token)
        if piece and row.request.text_events:
            emit(row.request, Delta(piece))
        if row.answer.stopped:
            return "stop"
        return "length" if len(row.tokens) >= row.params.max_tokens else None


def emit(request: GenerationRequest, event: Delta | Finished) -> None:
    """Hand an event to the request's callback; a failing callback (a client gone) never stops the scheduler."""
    try:
        request.on_event(event)
    except Exception:
        logger.exception("event callback failed")
