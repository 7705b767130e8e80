"""Throughput of `sparsevl api` under load: held-out questions sent by many concurrent `openai` clients
against the same questions sent one at a time, for the plain model and with a pruning setting.

Each setting starts its own `sparsevl api` process (127.0.0.1, a free port), warms it up, then times
--repeats passes of the questions one at a time and from --clients concurrent clients, interleaved (asyncio
tasks, each with its own `openai.AsyncOpenAI` client; greedy, max_tokens = --max_new_tokens). It prints
requests/s of the median pass (and of each pass), the ratio of the median passes, p50/p95 latency, how many
answers equal `sparsevl eval`'s greedy answers (the same generation code, batched by eval's own batcher), and
the server's CPU time per request (its processes together) in both modes, a figure that depends less than
wall-clock time on other jobs sharing the machine. The last line is the plain setting's ratio.

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
from dataclasses import dataclass
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
    p.add_argument("--repeats", type=int, default=3,
                   help="passes of every question per mode, one at a time and concurrent interleaved; the "
                        "speed-up compares the median passes")
    p.add_argument("--server_flags", default="",
                   help="more `sparsevl api` flags for both settings, e.g. '--engine thread'")
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


@dataclass
class Pass:
    """One pass of every question, at one concurrency."""

    answers: list[str]  # in question order
    latencies: list[float]  # seconds, in question order
    seconds: float  # wall time of the pass
    server_cpu: float  # CPU seconds of the server's processes during the pass


async def send_all(pool: list[openai.AsyncOpenAI], model_id: str, records: list[dict], max_tokens: int):
    """Send every record from the clients of `pool` at once (one asyncio task per client, each sending the next
    record when its answer is back); (answers in record order, latencies, wall seconds)."""
    answers, latencies = [None] * len(records), [0.0] * len(records)
    next_index = iter(range(len(records)))

    async def worker(client):
        for index in next_index:
            answers[index], latencies[index] = await ask(client, model_id, records[index], max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker(client) for client in pool))
    return answers, latencies, time.perf_counter() - start


async def timed_passes(base: str, model_id: str, records: list[dict], args, server_cpu) -> dict[int, list[Pass]]:
    """--repeats passes one at a time and from --clients clients, interleaved, so that a slow phase of the machine
    hits both modes. The clients are made and connected once, before any clock starts (building one costs
    ~0.15 s of TLS setup), and kept across passes, as a client that talks to a server keeps its connection."""
    pool = [openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
            for _ in range(args.clients)]
    try:
        await send_all(pool, model_id, records[: args.clients], args.max_new_tokens)  # warm-up, one each
        passes = {1: [], args.clients: []}
        for _ in range(args.repeats):
            for clients in passes:
                before = server_cpu()
                answers, latencies, seconds = await send_all(pool[:clients], model_id, records, args.max_new_tokens)
                passes[clients].append(Pass(answers, latencies, seconds, server_cpu() - before))
        return passes
    finally:
        await asyncio.gather(*(client.close() for client in pool))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def measure(args, name: str, flags: list[str], records: list[dict]) -> float:
    """One setting: eval's answers, then the timed passes on a fresh server; the ratio of the median pass times."""
    expected = eval_answers(args.model, Path(args.data), records, flags, args.max_new_tokens)
    server_flags = [*flags, *shlex.split(args.server_flags)]
    process, base = start_server(args.model, server_flags, args.clients)
    try:
        server = psutil.Process(process.pid)
        processes = [server, *server.children(recursive=True)]  # the API and its engine process
        server_cpu = lambda: sum(sum(p.cpu_times()[:2]) for p in processes)  # noqa: E731 (user + system s)
        passes = asyncio.run(timed_passes(base, Path(args.model).resolve().name, records, args, server_cpu))
    finally:
        process.terminate()
        process.wait(60)
    print(f"[{name}] {len(records)} questions x {args.repeats} passes, max_tokens {args.max_new_tokens}, flags: "
          f"{shlex.join(server_flags) or '-'}")
    seconds, cpu_ms = {}, {}
    for clients, runs in passes.items():
        seconds[clients] = statistics.median(run.seconds for run in runs)
        cpu_ms[clients] = statistics.median(run.server_cpu for run in runs) * 1000 / len(records)
        latencies = [latency for run in runs for latency in run.latencies]
        label = "one at a time:" if clients == 1 else f"{clients} clients:"
        print(f"  {label:<14} {len(records) / seconds[clients]:.2f} req/s (median pass; passes "
              f"{', '.join(f'{len(records) / run.seconds:.1f}' for run in runs)}), latency p50 "
              f"{percentile(latencies, 50):.3f} s p95 {percentile(latencies, 95):.3f} s")
    worst = {clients: min(sum(a == e for a, e in zip(run.answers, expected)) for run in runs)
             for clients, runs in passes.items()}
    print(f"  answers equal to sparsevl eval's (worst pass): one at a time {worst[1]}/{len(records)}, "
          f"concurrent {worst[args.clients]}/{len(records)}")
    print(f"  server CPU per request (median pass): one at a time {cpu_ms[1]:.1f} ms, {args.clients} clients "
          f"{cpu_ms[args.clients]:.1f} ms ({cpu_ms[1] / cpu_ms[args.clients]:.2f}x less)")
    ratio = seconds[1] / seconds[args.clients]
    print(f"  speed-up: {ratio:.2f}x", flush=True)
    return ratio


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.repeats < 1 or args.clients < 2:
        parser().error(f"--repeats must be >= 1 and --clients >= 2, got {args.repeats} and {args.clients}")
    records = load_questions(Path(args.data), args.num_questions)
    if args.pruning:
        measure(args, "pruned", shlex.split(args.pruning), records)
    ratio = measure(args, "plain", [], records)
    print(f"api speed-up vs one at a time: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
