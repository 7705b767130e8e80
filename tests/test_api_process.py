"""`sparsevl api` as a process: it serves from the command line, and SIGTERM lets the request in flight
finish (its answer whole and equal to greedy generation) before the process exits (by the signal, which
uvicorn re-raises once drained), its engine process with it."""

import base64
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest
import torch

from sparsevl.data.conversation import prompt_ids
from sparsevl.eval.run import load_for_inference

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_sigterm_finishes_the_request_in_flight_then_exits(lively_checkpoint, shapes_dir):
    png = (shapes_dir / "images" / "test" / "000001.png").read_bytes()
    question, max_tokens = "describe the picture", 300
    model, tokenizer, processor = load_for_inference(lively_checkpoint)
    from PIL import Image

    ids = prompt_ids("<image>\n" + question, tokenizer)
    pixels = processor(images=[Image.open(shapes_dir / "images" / "test" / "000001.png").convert("RGB")],
                       return_tensors="pt")["pixel_values"]
    tokens = model.generate(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), pixels,
                            max_new_tokens=max_tokens, eos_token_id=tokenizer.eos_token_id)[0]
    assert len(tokens) > 100  # precondition: the answer is long enough to be in flight when SIGTERM arrives
    expected = tokenizer.decode(tokens, skip_special_tokens=True).strip()

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([sys.executable, "-m", "sparsevl", "api", "--model", str(lively_checkpoint),
                               "--port", str(port), "--model_name", "tiny"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(300):
            try:
                assert httpx.get(f"{base}/models", timeout=1).json()["data"][0]["id"] == "tiny"
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "tiny", "max_tokens": max_tokens, "temperature": 0, "stream": True, "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(png).decode()}},
                {"type": "text", "text": question}]}]}
        engine = [child for child in psutil.Process(server.pid).children()  # where the model decodes
                  if "spawn_main" in " ".join(child.cmdline())]  # (not multiprocessing's resource tracker)
        assert len(engine) == 1
        with httpx.stream("POST", f"{base}/chat/completions", json=body, timeout=120) as response:
            lines = response.iter_lines()
            first = next(lines)
            server.send_signal(signal.SIGTERM)  # after the first chunk: the answer has just begun
            rest = [line for line in lines if line]
        assert server.wait(60) == -signal.SIGTERM  # uvicorn drains, then re-raises the signal it caught
        assert not engine[0].is_running() or engine[0].status() == psutil.STATUS_ZOMBIE  # stopped with it
    finally:
        if server.poll() is None:
            server.kill()
    chunks = [json.loads(line[6:]) for line in [first, *rest] if line != "data: [DONE]"]
    assert rest[-1] == "data: [DONE]"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == expected
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{base}/models", timeout=2)


def test_api_cli_refuses_bad_flags(lively_checkpoint, capsys):
    from sparsevl.serve.api import main

    assert main(["--model", str(lively_checkpoint), "--max_batch_size", "0"]) == 2
    assert "--max_batch_size must be >= 1" in capsys.readouterr().err
    assert main(["--model", str(lively_checkpoint), "--batch_wait_ms", "-1"]) == 2  # refused before the child starts
    assert "--batch_wait_ms >= 0, got 16, 64, -1.0" in capsys.readouterr().err
    assert main(["--model", str(lively_checkpoint), "--token_pruner", "nope"]) == 2
    assert "--token_pruner 'nope' is unknown" in capsys.readouterr().err


@pytest.mark.slow
def test_api_load_benchmark_runs_and_answers_as_eval(lively_checkpoint, shapes_dir, capsys, monkeypatch):
    """`python -m benchmarks.api_load` on a tiny scale: both settings answer exactly as `sparsevl eval` in every
    pass, and the last line is the one the issue names."""
    from benchmarks.api_load import main

    monkeypatch.chdir(REPO)  # the server subprocess imports sparsevl from here
    assert main(["--model", str(lively_checkpoint), "--data", str(shapes_dir / "test_qa.json"), "--num_questions",
                 "6", "--clients", "3", "--repeats", "2", "--max_new_tokens", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "answers equal" in line] == [
        "  answers equal to sparsevl eval's (worst pass): one at a time 6/6, concurrent 6/6"] * 2
    assert any(line.startswith("[pruned]") and "--token_pruner fastv" in line for line in out)
    assert re.fullmatch(r"api speed-up vs one at a time: \d+\.\d\dx", out[-1])
