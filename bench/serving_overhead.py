"""What the shadow log costs the endpoint: throughput and p50/p99 latency with it ON vs OFF, in one run, and what
its write-ahead log (every trajectory on disk before `submit` returns) costs on the request path.

One embedded engine serves two apps: one without a sink (OFF) and one whose ShadowLogger ships every choice
to a Tansu broker this bench starts (ON). Each phase is a fixed amount of work: `--requests` chat requests from
closed-loop clients (default 8), with the same seeds in both phases of a round, so ON and OFF generate the same
tokens and throughput is requests over wall time (a timed phase would cut requests off at its end, which with
SmolLM2's 9-second requests is most of the noise). The clients run in a separate process, so that only the
server's own threads (event loop, engine, shadow-log producer) share its interpreter, as in production. Phases
alternate over several rounds in ABBA order (OFF ON, ON OFF, ...) so that drift on a shared host hits both alike. With `--sink kafka` a third phase, NOWAL, runs a ShadowLogger
whose write-ahead log is off (`wal=False`), phases rotating over the rounds; the bench also times `submit` itself
with and without the log, in process. The line before last is the ratio of ON to OFF throughput (target >= 0.98);
the last is the ratio of ON (write-ahead log) to NOWAL throughput, with the per-submit cost beside it.
`--sink memory` replaces Kafka by an in-memory sink, which separates the cost of building trajectories from the
cost of shipping them (no NOWAL phase then).

    .venv/bin/python bench/serving_overhead.py                          # tiny student, about a minute
    .venv/bin/python bench/serving_overhead.py --model-dir ~/.cache/shadow-distill/models/<student> \\
        --max-tokens 64 --requests 32
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import tempfile
import time
import uuid
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

from _clients import MESSAGES, Phase, compare_on_off, merge, report, run_phase
from message_bus.broker import TansuBroker
from message_bus.topics import ensure_topics
from model_runtime.threads import torch_threads
from serving.api_server import BackgroundServer, build_app
from serving.config import ServingConfig
from serving.engine import EmbeddedEngine
from serving.shadow_log import ShadowLogger
from schemas.trajectory import SamplingParams, TrajectoryV1
from serving.trajectories import MemorySink

def sample_trajectory(i: int) -> TrajectoryV1:
    """A trajectory of the size the bench's requests log (a chat prompt, 32 tokens, both texts)."""
    return TrajectoryV1(trajectory_id=f"cost-{uuid.uuid4().hex}", request_id=f"cost-{i}", choice_index=0,
                        created_at=datetime.now(UTC), base_model_id="bench",
                        sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=32, seed=i),
                        prompt_token_ids=list(range(1, 40)), completion_token_ids=list(range(100, 132)),
                        behaviour_logprobs=[-1.25] * 32, logprob_kind="sampled", finish_reason="length",
                        prompt_text=MESSAGES[0]["content"] * 2, completion_text="The sea is grey and wide. " * 6)


def submit_cost_us(bootstrap: str, topic: str, tmp: Path, n: int = 600, rounds: int = 3) -> dict[str, tuple]:
    """p50 and p99 of `ShadowLogger.submit` in microseconds, with the write-ahead log and without, alternating."""
    loggers = {"wal": ShadowLogger(bootstrap, topic, tmp / "cost-wal", wal=True),
               "nowal": ShadowLogger(bootstrap, topic, tmp / "cost-nowal", wal=False)}
    times: dict[str, list[float]] = {name: [] for name in loggers}
    try:
        for r in range(rounds):
            for name, logger in (loggers.items() if r % 2 == 0 else reversed(loggers.items())):
                trajs = [sample_trajectory(r * n + i) for i in range(n)]
                for traj in trajs:
                    t0 = time.perf_counter()
                    logger.submit(traj)
                    times[name].append((time.perf_counter() - t0) * 1e6)
    finally:
        for logger in loggers.values():
            logger.close(10.0)
    return {name: (sorted(t)[len(t) // 2], sorted(t)[int(0.99 * len(t))]) for name, t in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="student folder (default: a tiny random student)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=256, help="requests per phase (same seeds ON and OFF)")
    parser.add_argument("--rounds", type=int, default=6, help="OFF/ON pairs, in ABBA order")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--sink", choices=["kafka", "memory"], default="kafka")
    parser.add_argument("--linger-ms", type=int, help="producer linger_ms (default: message_bus.topics' value)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with tempfile.TemporaryDirectory(prefix="serving-bench-") as tmp, torch_threads(args.torch_threads), \
            TansuBroker() as broker, clients:
        model_dir = args.model_dir
        if model_dir is None:
            from model_runtime.tiny import build_tiny_pair

            model_dir = build_tiny_pair(Path(tmp) / "tiny")[1]
        topic = f"bench.serving.{uuid.uuid4().hex[:8]}"
        ensure_topics(broker.bootstrap, {topic: 1})
        config = ServingConfig(model_dir=model_dir, max_batch_size=args.concurrency,
                               max_tokens_limit=max(args.max_tokens, 1), default_max_tokens=max(args.max_tokens, 1))
        engine = EmbeddedEngine.from_dir(model_dir, "auto", max_batch_size=args.concurrency)
        overrides = {} if args.linger_ms is None else {"linger_ms": args.linger_ms}
        sinks = ({name: ShadowLogger(broker.bootstrap, topic, Path(tmp) / f"spool-{name}", wal=name == "on",
                                     producer_overrides=overrides) for name in ("on", "nowal")}
                 if args.sink == "kafka" else {"on": MemorySink()})
        apps = {"off": build_app(config, engine, caller_salt="bench"),
                **{name: build_app(config, engine, sink=sink, caller_salt="bench") for name, sink in sinks.items()}}
        phases: dict[str, list[Phase]] = {name: [] for name in apps}
        try:
            with contextlib.ExitStack() as servers:
                urls = {name: servers.enter_context(BackgroundServer(app)).url for name, app in apps.items()}
                run_phase(clients, urls["off"], engine.base_model_id, Phase("warm"),
                          argparse.Namespace(**{**vars(args), "requests": 2 * args.concurrency}), 10**6)
                for r in range(args.rounds):
                    for name in phase_order(list(apps), r):
                        phase = Phase(name)
                        run_phase(clients, urls[name], engine.base_model_id, phase, args, first_seed=r * 10**5)
                        phases[name].append(phase)
                        print(f"round {r + 1} {report(phase)}", flush=True)
        finally:
            engine.close()
            for sink in sinks.values():
                sink.close(10.0)
        stats = sinks["on"].stats()
        cost = submit_cost_us(broker.bootstrap, topic, Path(tmp)) if args.sink == "kafka" else None
    on_total, off_total = compare_on_off(phases)
    print(f"shadow log: accepted {stats.get('accepted')} sent {stats.get('sent')} spooled {stats.get('spooled')} "
          f"dropped {stats.get('dropped')} wal_syncs {stats.get('wal_syncs')}")
    print(f"throughput ratio on/off: {on_total.throughput / off_total.throughput:.3f}")
    if cost is not None:
        nowal_total = merge(phases["nowal"])
        print(report(nowal_total))
        print(f"write-ahead log: submit p50 {cost['wal'][0]:.1f} us / p99 {cost['wal'][1]:.1f} us with it, "
              f"p50 {cost['nowal'][0]:.1f} us / p99 {cost['nowal'][1]:.1f} us without")
        print(f"throughput ratio wal/no-wal: {on_total.throughput / nowal_total.throughput:.3f} "
              f"(+{cost['wal'][0] - cost['nowal'][0]:.1f} us per submit, p50)")


def phase_order(names: list[str], r: int) -> list[str]:
    """Round r's order: a rotation (two phases: ABBA), so drift on a shared host hits each phase alike."""
    if len(names) == 2:
        return names if r % 2 == 0 else names[::-1]
    k = r % len(names)
    return names[k:] + names[:k]


if __name__ == "__main__":
    main()
