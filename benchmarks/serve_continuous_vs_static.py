"""Continuous against static batching: the same engine and model behind the HTTP server.

Loopback only, bounded: a fixed list of requests (mixed prompt and output lengths, seeded)
is streamed by concurrent clients to a server on 127.0.0.1; once with continuous batching
(requests join the running batch between steps), once with static batching (a batch is
admitted only when the previous one has finished entirely). Greedy decoding with
`ignore_eos`, so both runs must produce the same text for every request, which the script
checks, along with every request finishing with exactly its max_tokens. Prints
throughput, time to first token and latency percentiles.

The load generator is one asyncio loop in a separate process that speaks HTTP/1.1 through
h11 (uvicorn's own dependency) and parses the server-sent events itself: the official
`openai` client (which the tests use) spent ~0.35 ms of CPU per streamed token, on the
same two cores as the server.

    python benchmarks/serve_continuous_vs_static.py [--requests 64] [--clients 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import multiprocessing
import pathlib
import sys
import tempfile
import time

import h11
import jax
import numpy as np

from llm_jax.config import DataConfig, ExperimentConfig, ModelConfig, TrainConfig
from llm_jax.data.tokenizers import CharTokenizer
from llm_jax.inference.server import ServerConfig, bind_socket, load_server, start_in_thread
from llm_jax.models import count_params, init_params
from llm_jax.training.checkpoint import save_model_checkpoint

TOKENIZER = CharTokenizer(list("abcdefghijklmnopqrstuvwxyz .,:\n"))
MODEL = ModelConfig(vocab_size=TOKENIZER.vocab_size, d_model=128, n_layers=4, n_heads=4, d_ff=512, max_seq_len=256)
ENGINE = dict(max_batch=8, page_size=16, prefill_chunk=64, prefill_rows=2)
TIME_LIMIT_S = 300  # per run; a run that takes longer is reported as failed
MODES = (("static", True), ("continuous", False))


def write_run_dir(root: pathlib.Path) -> pathlib.Path:
    run_dir = root / "bench_model"
    params = init_params(MODEL, jax.random.key(0))
    config = ExperimentConfig(name="bench", model=MODEL, data=DataConfig(seq_len=MODEL.max_seq_len),
                              train=TrainConfig(run_dir=str(run_dir)))
    save_model_checkpoint(run_dir, config, params)
    TOKENIZER.save(run_dir / "tokenizer")
    return run_dir


def workload(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(prompt, max_tokens): prompts of 8-96 characters; outputs mostly short, a long tail."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz "))
    out = []
    for _ in range(n):
        prompt = "".join(rng.choice(letters, int(rng.integers(8, 97))))
        max_tokens = int(rng.choice([8, 16, 32, 64, 128], p=[0.4, 0.25, 0.15, 0.1, 0.1]))
        out.append((prompt, max_tokens))
    return out


async def one_request(host: str, port: int, prompt: str, max_tokens: int) -> dict:
    """One streaming completion over its own connection; the events are parsed as they arrive."""
    start = time.perf_counter()
    payload = json.dumps(dict(model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                              stream_options={"include_usage": True}, ignore_eos=True)).encode()
    reader, writer = await asyncio.open_connection(host, port)
    conn = h11.Connection(h11.CLIENT)
    headers = [("Host", f"{host}:{port}"), ("Content-Type", "application/json"),
               ("Content-Length", str(len(payload))), ("Connection", "close")]
    writer.write(conn.send(h11.Request(method="POST", target="/v1/completions", headers=headers))
                 + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
    first, text, reason, tokens, pending = None, [], None, 0, b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(1 << 16))
            elif isinstance(event, h11.Response) and event.status_code != 200:
                raise RuntimeError(f"the server answered {event.status_code}")
            elif isinstance(event, h11.Data):
                *events, pending = (pending + event.data).split(b"\n\n")
                for line in events:
                    data = line.removeprefix(b"data: ")
                    if data == b"[DONE]":
                        continue
                    chunk = json.loads(data)
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk["choices"]:
                        if choice["text"] and first is None:
                            first = time.perf_counter()
                        text.append(choice["text"])
                        reason = choice["finish_reason"] or reason
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    finally:
        writer.close()
    end = time.perf_counter()
    return dict(text="".join(text), reason=reason, tokens=tokens, ttft=(first or end) - start, latency=end - start,
                max_tokens=max_tokens)


def run_clients(url: str, requests, clients: int):
    """All requests, at most `clients` streaming at once; (results in request order, wall seconds)."""
    host, port = url.split("//")[1].split("/")[0].split(":")

    async def all_requests():
        gate = asyncio.Semaphore(clients)

        async def one(prompt, max_tokens):
            async with gate:
                return await one_request(host, int(port), prompt, max_tokens)

        return await asyncio.wait_for(asyncio.gather(*(one(*r) for r in requests)), TIME_LIMIT_S)

    start = time.perf_counter()
    results = asyncio.run(all_requests())
    return results, time.perf_counter() - start


def start_server(run_dir: pathlib.Path, n_requests: int, static: bool):
    app, engine = load_server(run_dir, engine_options=dict(ENGINE, static_batching=static),
                              server_config=ServerConfig(model_name="bench", max_concurrent=n_requests))
    sock = bind_socket("127.0.0.1", 0)
    server = start_in_thread(app, sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    run_clients(url, [("warm up", 4)], 1)
    return server, engine, url


def run_all(run_dir: pathlib.Path, requests, clients: int, repeats: int) -> dict:
    """Both servers up at once; the modes alternate `repeats` times, so that load from other
    processes on the machine falls on both alike. Each mode keeps its median run."""
    servers = {name: start_server(run_dir, len(requests), static) for name, static in MODES}
    runs = {name: [] for name, _ in MODES}
    # The clients run in another process, so that parsing their streams does not compete
    # with the servers for this process's interpreter lock (spawned: never fork under JAX).
    spawn = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as process:
            for _ in range(repeats):
                for name, _ in MODES:
                    engine = servers[name][1]
                    steps = engine.stats["steps"]
                    results, wall = process.submit(run_clients, servers[name][2], requests, clients).result(
                        timeout=TIME_LIMIT_S)
                    runs[name].append(dict(results=results, wall=wall, steps=engine.stats["steps"] - steps,
                                           preemptions=engine.stats["preemptions"]))
    finally:
        for server, _, _ in servers.values():
            server.should_exit = True
            server.thread.join(timeout=30)
    return {name: sorted(r, key=lambda run: run["wall"])[len(r) // 2] for name, r in runs.items()} | {
        "walls": {name: [run["wall"] for run in r] for name, r in runs.items()}}


def summary(name: str, run: dict) -> str:
    res = run["results"]
    tokens = sum(r["tokens"] for r in res)
    ttft = np.array([r["ttft"] for r in res]) * 1e3
    lat = np.array([r["latency"] for r in res])
    complete = sum(r["reason"] == "length" and r["tokens"] == r["max_tokens"] for r in res)
    return (f"{name:12s} {tokens / run['wall']:9.1f} {run['wall']:8.2f} {np.percentile(ttft, 50):9.0f} "
            f"{np.percentile(ttft, 95):9.0f} {np.percentile(lat, 50):8.2f} {np.percentile(lat, 95):8.2f} "
            f"{np.percentile(lat, 99):8.2f} {complete:>5d}/{len(res)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode (alternating); the median is shown")
    args = parser.parse_args(argv)
    requests = workload(args.requests)
    print(f"model: {count_params(MODEL):,} params (d_model {MODEL.d_model}, {MODEL.n_layers} layers, context "
          f"{MODEL.max_seq_len}); engine {ENGINE}; {len(requests)} requests, {args.clients} concurrent clients; "
          f"prompt chars {min(len(p) for p, _ in requests)}-{max(len(p) for p, _ in requests)}, "
          f"max_tokens {min(m for _, m in requests)}-{max(m for _, m in requests)}; {jax.devices()[0].platform}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = run_all(write_run_dir(pathlib.Path(tmp)), requests, args.clients, args.repeats)
    walls = runs.pop("walls")
    print(f"{'batching':12s} {'tok/s':>9s} {'wall s':>8s} {'TTFT p50':>9s} {'TTFT p95':>9s} {'lat p50':>8s} "
          f"{'lat p95':>8s} {'lat p99':>8s} {'complete':>8s}")
    print(f"{'':12s} {'':>9s} {'':>8s} {'ms':>9s} {'ms':>9s} {'s':>8s} {'s':>8s} {'s':>8s}")
    for name, run in runs.items():
        print(summary(name, run))
    same = all(a["text"] == b["text"] for a, b in zip(runs["static"]["results"], runs["continuous"]["results"]))
    complete = all(r["reason"] == "length" and r["tokens"] == r["max_tokens"]
                   for run in runs.values() for r in run["results"])
    ratio = runs["static"]["wall"] / runs["continuous"]["wall"]
    print(f"continuous / static throughput: {ratio:.2f}x (goal >= 2x), medians of {args.repeats} alternating runs; "
          f"walls s: " + "; ".join(f"{n} " + ", ".join(f"{w:.2f}" for w in ws) for n, ws in walls.items()))
    print(f"engine steps: static {runs['static']['steps']}, continuous {runs['continuous']['steps']}; every request "
          f"complete: {complete}; same text in both modes: {same}; preemptions: {runs['continuous']['preemptions']}")
    return 0 if complete and same else 1


if __name__ == "__main__":
    sys.exit(main())
