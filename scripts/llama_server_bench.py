#!/usr/bin/env python3
"""llama.cpp's llama-server under the load `espalier bench serve` puts on Espalier's daemon.

The same prompt (cli/src/bench_serve.rs's PROMPT, read from there), the same greedy streaming
completions of --max-tokens tokens, 1, 4 and 16 concurrent streams; prints time to first token
p50/p99, decode tokens/s per stream and aggregate, and the aggregate vs one stream, as
`espalier bench serve` does, so the two tables compare row by row.

Usage (after scripts/llama_cpp_bench.py built llama.cpp and made the GGUFs):
    python3 scripts/llama_server_bench.py --server target/llama.cpp/.../build/bin/llama-server \
        --model target/llama.cpp/smollm2-135m-instruct-f32.gguf [--threads 2] [--max-tokens 64]

It starts llama-server on a free loopback port with one slot per stream of the largest round
(continuous batching is llama-server's default) and stops it at the end.
"""

import argparse
import concurrent.futures
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time


def prompt():
    src = open(os.path.join(os.path.dirname(__file__), "..", "cli", "src", "bench_serve.rs")).read()
    m = re.search(r'const PROMPT: &str = "(.*?)";', src, re.S)
    return re.sub(r"\\\n", "", m.group(1))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_once(port, text, max_tokens):
    body = json.dumps({"prompt": text, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True},
                       # No reuse of an earlier request's prompt cache: Espalier has none.
                       "cache_prompt": False})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.monotonic()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = conn.getresponse()
    ttft, tokens, prompt_tokens = None, 0, 0
    for raw in r:
        line = raw.decode().strip()
        if not line.startswith("data: "):
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            break
        event = json.loads(data)
        choices = event.get("choices") or []
        if ttft is None and choices and choices[0].get("text"):
            ttft = time.monotonic() - started
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
            prompt_tokens = event["usage"]["prompt_tokens"]
        elif event.get("timings"):
            tokens = event["timings"].get("predicted_n", tokens)
            prompt_tokens = event["timings"].get("prompt_n", prompt_tokens)
    total = time.monotonic() - started
    conn.close()
    return {"ttft": ttft if ttft is not None else total, "total": total, "tokens": tokens,
            "prompt_tokens": prompt_tokens}


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--server", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--streams", default="1,4,16")
    args = p.parse_args()
    rounds = [int(s) for s in args.streams.split(",")]
    port = free_port()
    slots = max(rounds)
    ctx = slots * 512
    server = subprocess.Popen([args.server, "-m", args.model, "-t", str(args.threads),
                               "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
                               "-c", str(ctx)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                c.request("GET", "/health")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                sys.exit("llama-server did not become healthy")
            time.sleep(0.5)
        text = prompt()
        stream_once(port, text, 4)  # warm-up, as the daemon's model load
        print(f"{'streams':>7} {'prompt':>6} {'tokens':>6} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'tok/s/stream':>12} {'tok/s aggr':>10} {'vs 1':>6}")
        single = None
        for n in rounds:
            started = time.monotonic()
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                results = list(pool.map(lambda _: stream_once(port, text, args.max_tokens),
                                        range(n)))
            wall = time.monotonic() - started
            ttfts = [r["ttft"] * 1000 for r in results]
            tokens = sum(r["tokens"] for r in results)
            per_stream = statistics.median(
                (r["tokens"] - 1) / (r["total"] - r["ttft"]) for r in results
                if r["tokens"] > 1 and r["total"] > r["ttft"])
            aggregate = tokens / wall
            single = single or aggregate
            print(f"{n:>7} {results[0]['prompt_tokens']:>6} {tokens:>6} "
                  f"{percentile(ttfts, 0.5):>7.0f}ms {percentile(ttfts, 0.99):>7.0f}ms "
                  f"{per_stream:>12.1f} {aggregate:>10.1f} {aggregate / single:>5.2f}x")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
