"""The scheduler in a child process (`--engine process`, the API's default): answers equal the model's own
greedy generation; cancel, the queue limit and close reach the child; a child that dies fails its requests
instead of leaving them waiting; a child whose parent dies exits."""

import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from PIL import Image

from sparsevl.data.conversation import prompt_ids
from sparsevl.eval.run import load_for_inference
from sparsevl.serve.api import parser
from sparsevl.serve.engine_process import EngineProcess
from sparsevl.serve.sampling import SamplingParams
from sparsevl.serve.scheduler import Delta, Finished, GenerationRequest, QueueFull

REPO = Path(__file__).resolve().parents[1]
QUESTION = "describe the picture"  # long greedy answers from the lively checkpoint (over 100 tokens)


@pytest.fixture(scope="module")
def prompt(lively_checkpoint, shapes_dir):
    """(input ids, pixel values) of one question about one test image."""
    _, tokenizer, processor = load_for_inference(lively_checkpoint)
    image = Image.open(shapes_dir / "images" / "test" / "000001.png").convert("RGB")
    return prompt_ids("<image>\n" + QUESTION, tokenizer), processor(images=[image], return_tensors="pt")["pixel_values"]


def make_engine(checkpoint, **options) -> EngineProcess:
    return EngineProcess(checkpoint, parser().parse_args(["--model", str(checkpoint)]), **options).start()


def request(prompt, max_tokens: int, *, text_events: bool = True, **sampling) -> tuple[GenerationRequest, queue.Queue]:
    events = queue.Queue()
    ids, pixels = prompt
    return GenerationRequest(ids, pixels, SamplingParams(max_tokens=max_tokens, **sampling), events.put,
                             text_events=text_events), events


def drain(events: queue.Queue, timeout: float = 120) -> list:
    """Every event up to and including the Finished one."""
    seen = [events.get(timeout=timeout)]
    while not isinstance(seen[-1], Finished):
        seen.append(events.get(timeout=timeout))
    return seen


def test_answers_cancel_queue_limit_and_close_cross_to_the_child(lively_checkpoint, prompt):
    model, tokenizer, _ = load_for_inference(lively_checkpoint)
    ids, pixels = prompt
    greedy = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                            max_new_tokens=300, eos_token_id=tokenizer.eos_token_id)[0]
    assert len(greedy) > 100  # precondition: long enough to be cancelled, or to hold a row, mid-answer
    engine = make_engine(lively_checkpoint, max_batch_size=2, max_queue=1)
    try:
        cancelled, cancelled_events = request(prompt, 300, temperature=1.0, seed=0)
        engine.submit(cancelled)
        assert isinstance(cancelled_events.get(timeout=120), Delta)  # decoding has begun
        engine.cancel(cancelled)
        done = drain(cancelled_events)[-1]
        assert done.finish_reason == "cancelled" and len(done.token_ids) < 300

        running = [request(prompt, 300) for _ in range(2)]  # both rows busy for 100+ steps
        waiting = request(prompt, 300, text_events=False)
        for generation, _ in [*running, waiting]:
            engine.submit(generation)
        assert engine.num_outstanding == 3
        with pytest.raises(QueueFull):
            engine.submit(request(prompt, 5)[0])
        engine.close()  # finishes what is outstanding, then stops the child
        for _, events in running:
            streamed = drain(events)
            assert streamed[-1].token_ids == greedy and "".join(e.text for e in streamed[:-1]) == streamed[-1].text
        assert [type(e) for e in drain(waiting[1])] == [Finished]  # no text pieces for a client that does not stream
        with pytest.raises(RuntimeError, match="shutting down"):
            engine.submit(request(prompt, 5)[0])
    finally:
        engine.close(timeout=60)
    assert engine._process.exitcode == 0


def test_a_dead_engine_fails_its_requests_and_refuses_new_ones(lively_checkpoint, prompt):
    engine = make_engine(lively_checkpoint)
    try:
        generation, events = request(prompt, 300)
        engine.submit(generation)
        assert isinstance(events.get(timeout=120), Delta)
        os.kill(engine._process.pid, signal.SIGKILL)
        done = drain(events)[-1]
        assert done.finish_reason == "error" and f"engine process exited with {-signal.SIGKILL}" in done.error
        with pytest.raises(RuntimeError, match="engine process exited"):
            engine.submit(request(prompt, 5)[0])
    finally:
        engine.close(timeout=60)


def test_the_engine_exits_when_its_parent_dies(lively_checkpoint, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from sparsevl.serve.api import parser\n"
        "from sparsevl.serve.engine_process import EngineProcess\n"
        "if __name__ == '__main__':\n"
        f"    engine = EngineProcess({str(lively_checkpoint)!r}, parser().parse_args(['--model', 'm'])).start()\n"
        "    print(engine._process.pid, flush=True)\n"
        "    time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        assert child.is_running()
        parent.kill()  # no chance to close the engine
        parent.wait(30)
        deadline = time.monotonic() + 30
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE  # gone (or only unreaped)
    finally:
        parent.kill()


def test_a_model_that_fails_to_load_raises_in_the_parent(lively_checkpoint):
    args = parser().parse_args(["--model", str(lively_checkpoint), "--token_pruner", "fastv", "--fastv_ratio", "2"])
    start = time.monotonic()
    with pytest.raises(ValueError, match="fastv_ratio"):
        EngineProcess(lively_checkpoint, args)
    assert time.monotonic() - start < 120
