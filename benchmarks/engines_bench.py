"""The serving app on vLLM vs on the hf engine, same run, same requests, over HTTP on a local Ray.

    python benchmarks/engines_bench.py [--requests 64] [--rate 8] [--rounds 3]
    python benchmarks/engines_bench.py --requests 4 --rate 4 --rounds 1 --max-tokens 8  # smoke

Both apps are up at once (one model replica each, on the tiny random model, fp32, 4 adapters,
4 adapter slots) and take turns: each round runs every workload on each engine in turn, so a
change in the machine's load hits both. Streams, so that the first token's time is seen:
(a) burst: `--requests` requests sent at once, mixed over the adapters and the base;
(b) base burst: the same, base model only (mixed-LoRA / base-only is the ratio of (a) to (b));
(c) Poisson: `--requests` requests arriving at `--rate` a second, max_tokens drawn from
    [4, `--max-tokens`] (4-128 by default), mixed adapters.
Per workload: generated tokens/s (wall), p50/p99 time to first token, median time per output token
(inter-token latency over a whole stream);
the median over rounds. Each answer runs to max_tokens (vLLM's ignore_eos; the hf engine's
random-model answers rarely end early, and tokens are counted from the usage either way).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ADAPTERS = ["red", "green", "blue", "gray"]
PROMPTS = ["How was the delivery?", "Is this a good product?", "The battery died after two days"]
ENGINES = ("vllm", "hf")


@dataclass
class Stream:
    sent: float
    token_times: list[float] = field(default_factory=list)
    tokens: int = 0


def body(k: int, model: str, max_tokens: int, engine: str) -> dict:
    out = {
        "model": model,
        "messages": [{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if engine == "vllm":
        out["ignore_eos"] = True  # vLLM's: every answer runs to max_tokens
    return out


async def one(client, url: str, payload: dict, delay: float) -> Stream:
    await asyncio.sleep(delay)  # the request's arrival time in the workload
    s = Stream(time.perf_counter())
    async with client.stream("POST", url, json=payload) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                s.token_times.append(time.perf_counter())
    return s


def workload(name: str, args, seed: int) -> list[tuple[str, int, float]]:
    """(model, max_tokens, arrival delay) per request."""
    rng = random.Random(seed)
    models = ["base", *ADAPTERS]
    if name == "base burst":
        return [("base", args.burst_tokens, 0.0)] * args.requests
    if name == "burst":
        return [(rng.choice(models), args.burst_tokens, 0.0) for _ in range(args.requests)]
    t, out = 0.0, []
    for _ in range(args.requests):
        out.append((rng.choice(models), rng.randint(4, args.max_tokens), t))
        t += rng.expovariate(args.rate)
    return out


async def run_workload(url: str, engine: str, requests) -> dict[str, float]:
    import httpx

    limits = httpx.Limits(max_connections=1024)
    async with httpx.AsyncClient(timeout=600, limits=limits) as c:
        start = time.perf_counter()
        streams = await asyncio.gather(
            *(one(c, url, body(k, m, n, engine), d) for k, (m, n, d) in enumerate(requests))
        )
        wall = time.perf_counter() - start
    ttft = sorted(s.token_times[0] - s.sent for s in streams if s.token_times)
    # Per stream, (last token - first token) / gaps: the time per output token. Gaps between
    # single events would mostly read 0 on vLLM: Ray Serve LLM sends stream events in batches
    # (experimental_configs stream_batching_interval_ms).
    tpot = [
        (s.token_times[-1] - s.token_times[0]) / (len(s.token_times) - 1)
        for s in streams
        if len(s.token_times) > 1
    ]
    return {
        "tok/s": sum(s.tokens for s in streams) / wall,
        "ttft p50": statistics.median(ttft),
        "ttft p99": ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "tpot p50": statistics.median(tpot) if tpot else float("nan"),
    }


def deploy(work: Path, port: int, adapters_dir: Path) -> dict[str, str]:
    from ray import serve

    from serve.app import build_app

    common = {
        "base_model": str(work / "tiny"),
        "adapters": {name: str(adapters_dir / name) for name in ADAPTERS},
        "allow_unauthenticated": True,
        "dtype": "float32",
        "context_window": 512,
        "max_loaded_adapters": 4,
        "max_batch_size": 16,
        "ingress_cpus": 0,
        "model_replicas": 1,
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for engine in ENGINES:
        extra = {"layout": "routed", "batch_wait_timeout_s": 0.01} if engine == "hf" else {}
        app = build_app({**common, "engine": engine, **extra})
        serve.run(app, name=engine, route_prefix=f"/{engine}")
        urls[engine] = f"http://127.0.0.1:{port}/{engine}/v1/chat/completions"
    return urls


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(results: dict) -> str:
    rows = [
        "| workload | engine | tok/s | TTFT p50 s | TTFT p99 s | time/token p50 ms |",
        "|---" * 6 + "|",
    ]
    for (name, engine), r in results.items():
        rows.append(
            f"| {name} | {engine} | {r['tok/s']:.0f} | {r['ttft p50']:.3f} | "
            f"{r['ttft p99']:.3f} | {1000 * r['tpot p50']:.1f} |"
        )
    return "\n".join(rows)


def median_of(rounds: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--rate", type=float, default=8.0, help="Poisson arrivals a second")
    p.add_argument("--max-tokens", type=int, default=128, help="Poisson: max_tokens in [4, N]")
    p.add_argument("--burst-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()

    import ray

    from jobs.tiny_model import main as build_tiny_model
    from serve.testing import make_random_adapter

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        build_tiny_model(work / "tiny", seed=0, hidden=256, layers=2)
        for seed, name in enumerate(ADAPTERS):
            make_random_adapter(work / "tiny", work / "adapters" / name, seed=seed)
        ray.init(
            address="local",
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}},  # serve/ in the replicas
        )
        try:
            urls = deploy(work, free_port(), work / "adapters")
            names = ("burst", "base burst", "poisson")
            for engine in ENGINES:  # warm: adapters loaded, code paths run
                asyncio.run(run_workload(urls[engine], engine, workload("burst", args, 99)))
            rounds: dict = {(n, e): [] for n in names for e in ENGINES}
            for r in range(args.rounds):
                for name in names:
                    for engine in ENGINES if r % 2 == 0 else ENGINES[::-1]:
                        requests = workload(name, args, seed=r)
                        rounds[name, engine].append(
                            asyncio.run(run_workload(urls[engine], engine, requests))
                        )
        finally:
            ray.shutdown()
    results = {key: median_of(v) for key, v in rounds.items()}
    print(table(results))
    for engine in ENGINES:
        mixed = results["burst", engine]["tok/s"] / results["base burst", engine]["tok/s"]
        print(f"{engine}: mixed-LoRA / base-only tokens/s = {mixed:.2f}")
    ttft = results["poisson", "vllm"]["ttft p99"] / results["poisson", "hf"]["ttft p99"]
    print(f"Poisson p99 time to first token, vllm / hf = {ttft:.2f} (target <= 0.5)")


if __name__ == "__main__":
    main()
