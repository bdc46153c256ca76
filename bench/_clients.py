"""Closed-loop chat clients for the serving benches, in a child process, and the phases they measure.

The clients run in a separate process (spawned), so that only the server's own threads share its interpreter, as
in production; each phase is a fixed number of requests with fixed seeds, so two phases of a round generate the
same tokens and throughput is requests over wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import openai

MESSAGES = [{"role": "user", "content": "Write a short poem about the sea in exactly three lines."}]


@dataclass
class Phase:
    name: str
    latencies_s: list[float] = field(default_factory=list)
    tokens: int = 0
    elapsed_s: float = 0.0

    @property
    def throughput(self) -> float:
        return len(self.latencies_s) / self.elapsed_s if self.elapsed_s else 0.0

    def quantile(self, q: float) -> float:
        data = sorted(self.latencies_s)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")


async def _load(url: str, model: str, requests: int, concurrency: int, max_tokens: int,
                first_seed: int) -> tuple[list[float], int, float]:
    """(latencies, completion tokens, wall time) of `requests` chat requests from `concurrency` closed loops."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0, timeout=120)
    seeds = iter(range(first_seed, first_seed + requests))
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        for seed in seeds:  # one shared iterator: each seed is taken by exactly one worker
            t0 = time.perf_counter()
            r = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=max_tokens, seed=seed)
            latencies.append(time.perf_counter() - t0)
            tokens += r.usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await client.close()
    return latencies, tokens, elapsed


def load_in_child(*load_args) -> tuple[list[float], int, float]:
    """Runs in the client process: the load generator must not share the server's GIL, as no real client does."""
    return asyncio.run(_load(*load_args))


def run_phase(clients: ProcessPoolExecutor, url: str, model: str, phase: Phase, args: argparse.Namespace,
              first_seed: int) -> None:
    """Add one load of `args.requests` requests (`args.concurrency` loops, `args.max_tokens`) to `phase`."""
    latencies, tokens, elapsed = clients.submit(load_in_child, url, model, args.requests, args.concurrency,
                                                args.max_tokens, first_seed).result()
    phase.latencies_s += latencies
    phase.tokens += tokens
    phase.elapsed_s += elapsed


def merge(parts: list[Phase]) -> Phase:
    total = Phase(parts[0].name)
    for p in parts:
        total.latencies_s += p.latencies_s
        total.tokens += p.tokens
        total.elapsed_s += p.elapsed_s
    return total


def report(p: Phase) -> str:
    return (f"{p.name:>4}: {len(p.latencies_s):5d} requests  {p.throughput:7.2f} req/s  "
            f"{p.tokens / p.elapsed_s:8.1f} tok/s  p50 {p.quantile(0.5) * 1000:7.1f} ms  "
            f"p99 {p.quantile(0.99) * 1000:7.1f} ms")


def compare_on_off(phases: dict[str, list[Phase]]) -> tuple[Phase, Phase]:
    """Prints the OFF and ON totals and the per-round ON/OFF throughput ratios; returns (on, off) merged."""
    on_total, off_total = merge(phases["on"]), merge(phases["off"])
    print(report(off_total))
    print(report(on_total))
    ratios = sorted(on.throughput / off.throughput for on, off in zip(phases["on"], phases["off"], strict=True))
    print(f"per-round ratios on/off: {' '.join(f'{r:.3f}' for r in ratios)} "
          f"(median {ratios[len(ratios) // 2]:.3f}; their spread is this host's noise)")
    return on_total, off_total
