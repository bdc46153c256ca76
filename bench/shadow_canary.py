"""What shadow mode costs the client: throughput and p50/p99 latency with 10% of requests mirrored vs none.

One embedded engine serves one app (in-memory shadow log); the candidate, a random LoRA adapter, is resident
beside the champion for the whole run, so only the mirroring differs between phases: OFF (mirror stopped) and ON
(`--fraction` of requests mirrored to the candidate as background work, which runs only when no client request
waits). Each phase is a fixed number of closed-loop chat requests from `--concurrency` clients in a child process
(bench/_clients.py), with the same seeds in both phases of a round; the engine batches up to twice the clients
(`--max-batch-size`), the headroom a server in shadow mode keeps so that a mirrored request rides along in a client
batch instead of taking a batch of its own (on CPU a batch's cost is mostly per step, not per row); phases
alternate in ABBA order over
`--rounds` so that drift on a shared host hits both alike. Mirrored work that is still queued when an ON phase ends
is waited for before the next phase starts (it is the ON phase's cost). The last line is the ratio of ON to OFF
client throughput (target >= 0.88: mirroring 10% costs compute on a saturated CPU; the client p50 must stay within
10%).

    .venv/bin/python bench/shadow_canary.py                                     # tiny student, about a minute
    .venv/bin/python bench/shadow_canary.py --model-dir ~/.cache/shadow-distill/models/<student> --requests 48
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _clients import Phase, compare_on_off, report, run_phase  # noqa: E402

from model_runtime.adapters import random_adapter  # noqa: E402
from model_runtime.threads import torch_threads  # noqa: E402
from serving.api_server import BackgroundServer, build_app  # noqa: E402
from serving.config import ServingConfig  # noqa: E402
from serving.engine import EmbeddedEngine  # noqa: E402
from serving.engine_base import AdapterInfo  # noqa: E402
from serving.trajectories import MemorySink  # noqa: E402

CANDIDATE = "candidate"


def drain(mirror, timeout_s: float = 300.0) -> None:
    deadline = time.monotonic() + timeout_s
    while mirror.status()["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, help="student folder (default: a tiny random student)")
    parser.add_argument("--fraction", type=float, default=0.1, help="share of requests mirrored in ON phases")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, help="engine rows per batch (default: 2 x concurrency, so "
                                                           "mirrored rows can ride along in client batches)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--requests", type=int, default=160, help="requests per phase (same seeds ON and OFF)")
    parser.add_argument("--rounds", type=int, default=6, help="OFF/ON pairs, in ABBA order")
    parser.add_argument("--torch-threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    clients = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    with tempfile.TemporaryDirectory(prefix="shadow-canary-") as tmp, torch_threads(args.torch_threads), clients:
        model_dir = args.model_dir
        if model_dir is None:
            from model_runtime.tiny import build_tiny_pair

            model_dir = build_tiny_pair(Path(tmp) / "tiny")[1]
        batch = args.max_batch_size or 2 * args.concurrency
        config = ServingConfig(model_dir=model_dir, max_batch_size=batch, shadow_fraction=args.fraction,
                               shadow_max_pending=4 * args.concurrency, max_tokens_limit=max(args.max_tokens, 1),
                               default_max_tokens=max(args.max_tokens, 1))
        engine = EmbeddedEngine.from_dir(model_dir, "auto", max_batch_size=batch)
        sink = MemorySink(max_items=10)  # the log's cost is the same in both phases; keep memory flat
        app = build_app(config, engine, sink=sink, caller_salt="bench-caller-salt")
        mirror = app.state.mirror
        engine.load_named_adapter(AdapterInfo(CANDIDATE, random_adapter(model_dir, Path(tmp) / "cand", 7))).result()
        phases: dict[str, list[Phase]] = {"off": [], "on": []}
        try:
            with BackgroundServer(app) as server:
                run_phase(clients, server.url, engine.base_model_id, Phase("warm"),
                          argparse.Namespace(**{**vars(args), "requests": 2 * args.concurrency}), 10**6)
                for r in range(args.rounds):
                    for name in (("off", "on") if r % 2 == 0 else ("on", "off")):
                        phase = Phase(name)
                        if name == "on":
                            mirror.start(CANDIDATE)
                        started = time.perf_counter()
                        run_phase(clients, server.url, engine.base_model_id, phase, args, first_seed=r * 10**5)
                        if name == "on":
                            mirror.stop()
                            drain(mirror)
                            phase.elapsed_s = time.perf_counter() - started  # the queued mirrors count too
                        phases[name].append(phase)
                        print(f"round {r + 1} {report(phase)}", flush=True)
        finally:
            engine.close()
        status = mirror.status()
    on_total, off_total = compare_on_off(phases)
    print(f"mirrored {status['mirrored']} of {status['selected']} selected requests "
          f"({status['dropped']} dropped, {status['failed']} failed); client p50 on/off "
          f"{on_total.quantile(0.5) / off_total.quantile(0.5):.3f}")
    print(f"throughput ratio on/off: {on_total.throughput / off_total.throughput:.3f}")


if __name__ == "__main__":
    main()
