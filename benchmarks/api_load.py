"""Throughput of `sparsevl api` under load: held-out questions sent by many concurrent `openai` clients
against the same questions sent one at a time, for the plain model and with a pruning setting.

Each setting starts its own `sparsevl api` process (127.0.0.1, a free port), warms it up, then times the
questions one at a time and from --clients concurrent clients (asyncio tasks, each with its own
`openai.AsyncOpenAI` client; greedy, max_tokens = --max_new_tokens). It prints requests/s, the ratio,
p50/p95 latency, how many answers equal `sparsevl eval`'s greedy answers (the same generation code, batched
by eval's own batcher), and the server's CPU time per request (its processes together) in both modes, a
figure that depends less than wall-clock time on other jobs sharing the machine. The last line is the plain
setting's ratio.

    python -m benchmarks.api_load --model runs/demo/finetune --data runs/demo/data/test_qa.json
"""

import argparse
import asyncio
import base64
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="runs/demo/finetune", help="checkpoint directory (default: the demo model)")
    p.add_argument("--data", default="runs/demo/data/test_qa.json", help="held-out LLaVA JSON questions")
    p.add_argument("--num_questions", type=int, default=128, help="first N questions of --data")
    p.add_argument("--clients", type=int, default=16, help="concurrent clients")
    p.add_argument("--max_new_tokens", type=int, default=16, help="max_tokens per request (eval's default)")
    p.add_argument("--pruning", default="--token_pruner fastv",
                   help="pruning flags of the second setting, as `sparsevl api` takes them ('' to skip)")
    return p


def load_questions(data: Path, limit: int) -> list[dict]:
    """Records with their question text (no `<image>`) and image as a data URL."""
    from sparsevl.data.dataset import read_records
    from sparsevl.eval.generate import question_of

    records = read_records(data)[:limit]
    for record in records:
        png = (data.parent / record["image"]).read_bytes()
        record["text"] = question_of(record).replace("<image>", "").strip()
        record["url"] = "data:image/png;base64," + base64.b64encode(png).decode()
    return records


def eval_answers(model_dir: str, data: Path, records: list[dict], pruning: list[str], max_new_tokens: int):
    """Greedy answers from `sparsevl eval`'s generation path (batched by eval, 64 per batch)."""
    from sparsevl.eval.cli import parser as eval_parser
    from sparsevl.eval.generate import generate_answers
    from sparsevl.eval.run import load_for_inference
    from sparsevl.model.pruning import build_pruning_plan

    args = eval_parser().parse_args(["--model", model_dir, "--data", str(data), "--out", "unused", *pruning])
    model, tokenizer, processor = load_for_inference(model_dir)
    model.pruning = build_pruning_plan(args, model)
    return generate_answers(model, tokenizer, processor, records, image_folder=data.parent,
                            max_new_tokens=max_new_tokens, progress=False)


def start_server(model_dir: str, flags: list[str], clients: int) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "sparsevl", "api", "--model", model_dir, "--port", str(port),
               "--max_batch_size", str(clients), *flags]
    process = subprocess.Popen(command, env={**os.environ, "PYTHONPATH": str(Path.cwd())})
    base = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        try:
            httpx.get(f"{base}/models", timeout=1).raise_for_status()
            return process, base
        except httpx.HTTPError:
            if process.poll() is not None:
                raise SystemExit(f"sparsevl api exited with {process.returncode}: {shlex.join(command)}")
            time.sleep(0.2)
    process.kill()
    raise SystemExit("sparsevl api did not start within 120 s")


async def ask(client: openai.AsyncOpenAI, model_id: str, record: dict, max_tokens: int) -> tuple[str, float]:
    start = time.perf_counter()
    reply = await client.chat.completions.create(model=model_id, max_tokens=max_tokens, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": record["text"]},
                                     {"type": "image_url", "image_url": {"url": record["url"]}}]}])
    return reply.choices[0].message.content, time.perf_counter() - start


def run_load(base: str, model_id: str, records: list[dict], clients: int, max_tokens: int):
    """Send every record from `clients` concurrent clients (asyncio tasks, each with its own AsyncOpenAI client,
    made before the clock starts: building one costs ~0.15 s of TLS setup); (answers in record order,
    latencies, wall seconds)."""
    answers, latencies = [None] * len(records), [0.0] * len(records)
    next_index = iter(range(len(records)))

    async def worker(client):
        for index in next_index:
            answers[index], latencies[index] = await ask(client, model_id, records[index], max_tokens)

    async def timed() -> float:
        pool = [openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
                for _ in range(clients)]
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for client in pool))
        seconds = time.perf_counter() - start
        await asyncio.gather(*(client.close() for client in pool))
        return seconds

    seconds = asyncio.run(timed())
    return answers, latencies, seconds


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure(args, name: str, flags: list[str], records: list[dict]) -> float:
    """One setting: eval's answers, then one-at-a-time and concurrent load on a fresh server; the ratio."""
    expected = eval_answers(args.model, Path(args.data), records, flags, args.max_new_tokens)
    process, base = start_server(args.model, flags, args.clients)
    try:
        model_id = Path(args.model).resolve().name
        server = psutil.Process(process.pid)
        processes = [server, *server.children(recursive=True)]  # the API and its engine process
        server_cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in processes)  # noqa: E731 (user + system s)
        run_load(base, model_id, records[: args.clients], args.clients, args.max_new_tokens)  # warm-up
        before = server_cpu()
        serial, serial_lat, serial_s = run_load(base, model_id, records, 1, args.max_new_tokens)
        middle = server_cpu()
        together, lat, together_s = run_load(base, model_id, records, args.clients, args.max_new_tokens)
        cpu_ms = [(middle - before) * 1000 / len(records), (server_cpu() - middle) * 1000 / len(records)]
    finally:
        process.terminate()
        process.wait(60)
    ratio = serial_s / together_s
    print(f"[{name}] {len(records)} questions, max_tokens {args.max_new_tokens}, flags: {shlex.join(flags) or '-'}")
    print(f"  one at a time: {len(records) / serial_s:.2f} req/s, latency p50 {percentile(serial_lat, 50):.3f} s "
          f"p95 {percentile(serial_lat, 95):.3f} s")
    print(f"  {args.clients} clients:    {len(records) / together_s:.2f} req/s, latency p50 "
          f"{percentile(lat, 50):.3f} s p95 {percentile(lat, 95):.3f} s")
    print(f"  answers equal to sparsevl eval's: one at a time {sum(a == e for a, e in zip(serial, expected))}"
          f"/{len(records)}, concurrent {sum(a == e for a, e in zip(together, expected))}/{len(records)}")
    print(f"  server CPU per request: one at a time {cpu_ms[0]:.1f} ms, {args.clients} clients {cpu_ms[1]:.1f} ms "
          f"({cpu_ms[0] / cpu_ms[1]:.2f}x less)")
    print(f"  speed-up: {ratio:.2f}x", flush=True)
    return ratio


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    records = load_questions(Path(args.data), args.num_questions)
    if args.pruning:
        measure(args, "pruned", shlex.split(args.pruning), records)
    ratio = measure(args, "plain", [], records)
    print(f"api speed-up vs one at a time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
