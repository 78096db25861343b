"""Load on the OpenAI-compatible server (models.server): N concurrent streaming chat clients on 127.0.0.1, ours
(the continuous-batching engine) beside transformers' ``generate`` behind the same API one request at a time
(``--backend transformers``), same checkpoint, same run.

Model: the ``tiny`` preset (random weights, byte tokenizer, float32) on CPU, or ``1_8b`` in bf16 on a GPU. Each of
CLIENTS clients sends REQUESTS_PER_CLIENT streaming chat requests one after another (a prompt of about PROMPT_CHARS
bytes, greedy, max_tokens=NEW with ``ignore_eos``, so every reply is NEW tokens on both servers). Figures, over the
whole load (first request sent to last reply done): requests/s, generated tokens/s (from the replies' ``usage``),
time to first token (request sent -> first content chunk) and inter-token latency (gaps between content chunks,
which on both servers carry one token each except where UTF-8 bytes are held back) at p50 / p99. Nothing may be
lost: every request must come back with NEW tokens (no 429: the queue holds all clients).

    python -m pytest -q benchmarks/bench_server.py                        # CPU: 16 clients, both servers
    python benchmarks/bench_server.py --clients 16 --requests 2 --new 64  # the same, as a table
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import pytest
import torch
from common import OURS, card_name

from models import InternLM2Config, InternLM2ForCausalLM

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ON_GPU = torch.cuda.is_available()
PRESET = "1_8b" if ON_GPU else "tiny"
CLIENTS, REQUESTS_PER_CLIENT, PROMPT_CHARS, NEW = 16, 2, 96, 64
# The server's context: the prompts (~130 tokens with the template) + NEW fit. On CPU the decode step's cost grows
# with it (the paged attention reads every page of the block table), so it is sized to the load, as a deployment is.
MAX_SEQ_LEN = 256
PEER = "transformers-generate"
# One torch thread per server on CPU: two servers' OpenMP threads on a shared 2-core machine spin-wait on each other.
THREADS = 0 if ON_GPU else 1


def make_checkpoint(path: str) -> str:
    """The preset with random weights (vocab 272: the byte tokenizer) in train's export layout."""
    torch.manual_seed(0)
    config = dataclasses.replace(InternLM2Config.preset(PRESET), vocab_size=272, max_position_embeddings=2048)
    InternLM2ForCausalLM(config).save_pretrained(os.path.join(path, "model"), layout="llama",
                                                 dtype=torch.bfloat16 if ON_GPU else torch.float32)
    with open(os.path.join(path, "tokenizer.json"), "w") as f:
        json.dump({"kind": "byte", "spec": "byte", "vocab_size": 272}, f)
    return os.path.join(path, "model")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, backend: str, clients: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "models.server", "--model", model, "--served-model-name", "bench", "--port",
           str(port), "--backend", backend, "--max-batch", str(clients), "--max-queue", str(4 * clients),
           "--max-seq-len", str(MAX_SEQ_LEN), "--device", "cuda" if ON_GPU else "cpu"]
    if threads:
        cmd += ["--threads", str(threads)]
    proc = subprocess.Popen(cmd, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the {backend} server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError("server did not start")


@dataclasses.dataclass
class Load:
    requests: int
    tokens: int
    seconds: float
    ttft: list[float]
    itl: list[float]

    def row(self) -> dict:
        def pct(xs, p):
            return statistics.quantiles(xs, n=100, method="inclusive")[p - 1] * 1e3 if len(xs) > 1 else float("nan")

        return {"requests/s": self.requests / self.seconds, "tokens/s": self.tokens / self.seconds,
                "TTFT p50 ms": pct(self.ttft, 50), "TTFT p99 ms": pct(self.ttft, 99),
                "ITL p50 ms": pct(self.itl, 50), "ITL p99 ms": pct(self.itl, 99)}


async def _load(url: str, clients: int, requests_per_client: int, new: int) -> Load:
    import httpx

    ttft, itl, tokens = [], [], []

    async def one(client: httpx.AsyncClient, c: int, r: int) -> None:
        words = f"client {c} request {r}: please write about the number {c * 100 + r}. "
        body = {"model": "bench", "stream": True, "temperature": 0, "max_tokens": new, "ignore_eos": True,
                "stream_options": {"include_usage": True},
                "messages": [{"role": "user", "content": (words * 8)[:PROMPT_CHARS]}]}
        sent = time.perf_counter()
        last, got = None, None
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            if resp.status_code != 200:
                raise RuntimeError(f"request lost: HTTP {resp.status_code} {await resp.aread()}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    got = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                    now = time.perf_counter()
                    if last is None:
                        ttft.append(now - sent)
                    else:
                        itl.append(now - last)
                    last = now
        if got != new:
            raise RuntimeError(f"request lost: {got} tokens of {new}")
        tokens.append(got)

    async def client_loop(client, c):
        for r in range(requests_per_client):
            await one(client, c, r)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await one(client, -1, 0)                              # warm-up (not counted)
        ttft.clear(), itl.clear(), tokens.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(client, c) for c in range(clients)))
        seconds = time.perf_counter() - t0
    return Load(len(tokens), sum(tokens), seconds, ttft, itl)


def measure(model: str, backend: str, clients: int, requests_per_client: int, new: int, threads: int) -> Load:
    proc, url = start_server(model, backend, clients, threads)
    try:
        return asyncio.run(_load(url, clients, requests_per_client, new))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(str(tmp_path_factory.mktemp("bench_server")))


@pytest.mark.parametrize("impl", [OURS, PEER])
def test_server_load(benchmark, checkpoint, impl):
    backend = "engine" if impl == OURS else "transformers"
    loads = []
    benchmark.pedantic(lambda: loads.append(measure(checkpoint, backend, CLIENTS, REQUESTS_PER_CLIENT, NEW, THREADS)),
                       rounds=1, iterations=1)
    row = loads[0].row()
    benchmark.extra_info.update(group=f"server {PRESET} {CLIENTS} streaming clients x{REQUESTS_PER_CLIENT}, "
                                      f"{NEW} tokens", impl=impl, metric="tokens/s", value=row["tokens/s"],
                                ms=loads[0].seconds * 1e3, card=card_name(), **row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="a checkpoint (default: the preset with random weights)")
    p.add_argument("--clients", type=int, default=CLIENTS)
    p.add_argument("--requests", type=int, default=REQUESTS_PER_CLIENT, help="per client")
    p.add_argument("--new", type=int, default=NEW)
    p.add_argument("--threads", type=int, default=THREADS, help="torch threads of each server (0: torch's default)")
    p.add_argument("--backends", default="engine,transformers")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_checkpoint(tmp)
        rows = {}
        for backend in args.backends.split(","):
            rows[backend] = measure(model, backend, args.clients, args.requests, args.new, args.threads).row()
            print(backend, json.dumps(rows[backend]), flush=True)
    cols = list(next(iter(rows.values())))
    print(f"\n{PRESET}, {args.clients} concurrent streaming clients x {args.requests} requests, {args.new} tokens each,"
          f" {card_name()} (client process), servers with {args.threads or 'default'} torch thread(s)\n")
    print("| server | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for backend, row in rows.items():
        print(f"| {backend} | " + " | ".join(f"{row[c]:.1f}" for c in cols) + " |")
    if "engine" in rows and "transformers" in rows:
        print(f"\ntokens/s ratio: {rows['engine']['tokens/s'] / rows['transformers']['tokens/s']:.2f}x")


if __name__ == "__main__":
    main()
