"""Scored tokens/s with 1 and 2 scorer replicas at the same total threads, one run: what a replica costs.

Config 1x: one scorer process whose teacher forward uses T torch threads. Config 2x: two scorer processes in
one consumer group, T/2 threads each, splitting the topic's partitions. Both score the same trajectories (real
student samples, as bench/scoring_efficiency.py sends them) with the embedded teacher, end to end: Kafka poll ->
land in one sqlite feature store -> offset commit -> teacher -> scores written.

Per round: a fresh topic of `--partitions` partitions, group and store; the replicas start and join (not timed:
the bench waits until their /metrics own every partition between them); then the trajectories are sent and
the round is timed from the first send to the last score row written (`teacher_scores.scored_at`). Rounds
alternate 1x, 2x, 2x, 1x, ... so drift of the shared host hits both. Tokens are the completion tokens scored.
The last line is the median over round pairs of (2x tokens/s) / (1x tokens/s). On a host with as many cores
as T the expectation is about 1.0: the point is that splitting a scorer into replicas costs nothing, so
replicas scale with the cores (or GPUs) they are given; it does not make cores out of nothing.

    .venv/bin/python bench/scoring_scale.py                        # tiny teacher, 2 threads, about 2 minutes
    .venv/bin/python bench/scoring_scale.py --threads 4 -n 4096
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import sqlalchemy as sa
from kafka import KafkaProducer
from sqlalchemy.orm import Session

from _common import model_pair, sample_rollouts
from feature_store.store import FeatureStore
from message_bus.broker import TansuBroker, free_port
from message_bus.topics import ensure_topics, producer_config
from schemas.tables import TeacherScoreRow, TrajectoryRow
from schemas.trajectory import TrajectoryV1
from scoring_efficiency import to_trajectories

REPO = Path(__file__).resolve().parents[1]


class Replica:
    """One `python -m shadow_scoring` process with its own /metrics port."""

    def __init__(self, flags: list[str], name: str, threads: int, log_dir: Path):
        self.port, self.name = free_port(), name
        argv = [sys.executable, "-m", "shadow_scoring", *flags, "--client-id", name, "--torch-threads", str(threads),
                "--metrics-port", str(self.port)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
        self.log = (log_dir / f"{name}.log").open("w")
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=self.log)

    def owned(self) -> set[int]:
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return set()
        return {int(p) for p in re.findall(r'^shadow_scoring_owned_partition{[^}]*partition="(\d+)"', text, re.M)}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def send_all(bootstrap: str, topic: str, payloads: list[tuple[bytes, bytes]]) -> None:
    producer = KafkaProducer(**producer_config(bootstrap))
    for f in [producer.send(topic, key=k, value=v) for k, v in payloads]:
        f.get(timeout=30)
    producer.close()


def scored(store: FeatureStore) -> tuple[int, int, datetime | None]:
    """(score rows, completion tokens scored, time of the last score row)."""
    with Session(store.engine) as s:
        n, tokens, last = s.execute(sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(TeacherScoreRow.n_tokens), 0),
                                              sa.func.max(TeacherScoreRow.scored_at))).one()
    return n, tokens, last and (last.replace(tzinfo=UTC) if last.tzinfo is None else last)


def by_partition(store: FeatureStore) -> dict[int, tuple[int, datetime]]:
    """partition -> (score rows, time of its last score row)."""
    with Session(store.engine) as s:
        rows = s.execute(sa.select(TrajectoryRow.log_partition, sa.func.count(), sa.func.max(TeacherScoreRow.scored_at))
                         .join(TrajectoryRow, TrajectoryRow.trajectory_id == TeacherScoreRow.trajectory_id)
                         .group_by(TrajectoryRow.log_partition)).all()
    return {p: (n, last.replace(tzinfo=UTC) if last.tzinfo is None else last) for p, n, last in rows}


def replica_split(store: FeatureStore, owned: list[set[int]], started: datetime) -> str:
    """Each replica's share of the round and when it finished: a burst ends with its busiest replica, so the
    keys' split over partitions (random, even only on average) shows in a short round's time."""
    parts = by_partition(store)
    out = []
    for i, mine in enumerate(owned):
        rows = sum(parts[p][0] for p in mine if p in parts)
        done = max((parts[p][1] for p in mine if p in parts), default=started)
        out.append(f"scorer-{i} partitions {sorted(mine)}: {rows} rows, done at {(done - started).total_seconds():.2f} s")
    return "; ".join(out)


def run_round(bootstrap: str, workdir: Path, teacher_dir: Path, trajs: list[TrajectoryV1], replicas: int,
              threads: int, args: argparse.Namespace) -> tuple[int, float, float, str]:
    """(tokens, seconds, join seconds, the replicas' split) of one config: `replicas` processes x `threads`
    torch threads."""
    tag = uuid.uuid4().hex[:8]
    topic, dlq, store_url = f"bench.scale.{tag}", f"bench.scale.{tag}.dlq", f"sqlite:///{workdir}/store-{tag}.db"
    ensure_topics(bootstrap, {topic: args.partitions, dlq: 1})
    store = FeatureStore.open(store_url)
    flags = ["--bootstrap-servers", bootstrap, "--topic", topic, "--dlq-topic", dlq, "--group-id", f"bench-{tag}",
             "--store-url", store_url, "--teacher", str(teacher_dir), "--device", "cpu", "--topk", str(args.topk),
             "--batch-tokens", str(args.batch_tokens), "--max-poll-records", str(args.max_poll_records),
             "--session-timeout-ms", "6000", "--poll-timeout-ms", "200"]
    procs = [Replica(flags, f"scorer-{i}", threads, workdir) for i in range(replicas)]
    try:
        joined_at = time.monotonic()
        while set().union(*(p.owned() for p in procs)) != set(range(args.partitions)) \
                or not all(p.owned() for p in procs):
            if time.monotonic() - joined_at > 120 or any(p.proc.poll() is not None for p in procs):
                raise RuntimeError(f"the replicas never split the partitions; see {workdir}/scorer-*.log")
            time.sleep(0.2)
        join_s = time.monotonic() - joined_at
        owned = [p.owned() for p in procs]
        payloads = [(t.key, t.model_copy(update={"trajectory_id": uuid.uuid4().hex}).to_bytes()) for t in trajs]
        started = datetime.now(UTC)
        send_all(bootstrap, topic, payloads)
        deadline = time.monotonic() + args.timeout_s
        while (done := scored(store))[0] < len(trajs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{done[0]} of {len(trajs)} scored after {args.timeout_s} s")
            time.sleep(0.25)
    finally:
        for p in procs:
            p.stop()
        store.engine.dispose()
    n, tokens, last = done
    if n != len(trajs):
        raise RuntimeError(f"{n} score rows for {len(trajs)} trajectories")
    split = replica_split(FeatureStore(store.engine), owned, started)
    return tokens, (last - started).total_seconds(), join_s, split


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct teacher and its student")
    ap.add_argument("-n", "--trajectories", type=int, default=2048, help="trajectories per round")
    ap.add_argument("--min-tokens", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch threads in all, split between the replicas")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (even: 1x, 2x, 2x, 1x, ...)")
    ap.add_argument("--batch-tokens", type=int, default=8192)
    ap.add_argument("--max-poll-records", type=int, default=256)
    ap.add_argument("--topk", type=int, default=0)
    ap.add_argument("--timeout-s", type=float, default=600)
    args = ap.parse_args()
    if args.threads < 2 or args.threads % 2:
        ap.error("--threads must be even and >= 2 (it is split between two replicas)")
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as tmp, TansuBroker() as broker:
        workdir = Path(tmp)
        teacher_dir, student_dir = model_pair(args.real, workdir)
        t0 = time.perf_counter()
        rollouts = sample_rollouts(student_dir, args.trajectories, min_tokens=args.min_tokens,
                                   max_tokens=args.max_tokens, batch_size=16 if args.real else 64)
        trajs = to_trajectories(rollouts, "bench-student")
        print(f"sampled {len(trajs)} student trajectories in {time.perf_counter() - t0:.1f} s "
              f"({sum(len(t.completion_token_ids) for t in trajs)} completion tokens)", flush=True)
        rates: dict[int, list[float]] = {1: [], 2: []}
        for rnd in range(args.rounds):
            replicas = (1, 2, 2, 1)[rnd % 4]
            threads = args.threads // replicas
            tokens, seconds, join_s, split = run_round(broker.bootstrap, workdir, teacher_dir, trajs, replicas, threads,
                                                       args)
            rates[replicas].append(tokens / seconds)
            print(f"round {rnd}: {replicas} replica(s) x {threads} thread(s): {tokens} tok in {seconds:.2f} s = "
                  f"{tokens / seconds:.0f} tok/s (group join {join_s:.1f} s, not timed); {split}", flush=True)
    pairs = [two / one for one, two in zip(rates[1], rates[2])]
    summary = {"1x_tok_s": [round(r) for r in rates[1]], "2x_tok_s": [round(r) for r in rates[2]],
               "ratio_per_pair": [round(r, 3) for r in pairs]}
    print(f"{'SmolLM2' if args.real else 'tiny'} teacher, {args.threads} threads in all, {args.partitions} partitions, "
          f"{len(trajs)} trajectories per round: {json.dumps(summary)}; last line: median 2x / 1x, expect ~1.0")
    print(f"{statistics.median(pairs):.3f}")


if __name__ == "__main__":
    main()
