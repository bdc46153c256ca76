"""The loop under load, faults and bad input: is every answered request stored exactly once?

Starts the local stack (Tansu broker, MLflow, serving and the teacher scorer on tiny models, a fresh PostgreSQL
feature store reached by the scorer through a `shadow_distill.faults.TcpProxy`), sends K chat requests/s from
the official `openai` client (every 10th opted out with `X-Shadow-Log: off`) and, while the load runs, injects
faults one after another: poison messages on the topic, broker frozen, scorer SIGKILLed, database cut, serving
SIGTERMed and SIGKILLed (also under 8 requests/s: `serving_kill_loaded`), broker killed and restarted EMPTY.
Then it kills a nightly training run and reruns it.

Accounting is by request id (each request asks for n=1, so one trajectory each):
- answered = HTTP 200 at the client; expected = answered and not opted out;
- stored = rows in `trajectories` per request id (> 1 is a duplicate; trajectory_id is the primary key);
- broker-dropped: Tansu keeps nothing across a restart (production Kafka with RF 3 keeps what it acknowledged).
  Just before the kill, serving is frozen (SIGSTOP) so nothing new is produced or acknowledged; a tap consumer
  (group-less, reading every partition from the beginning) catches up to the end offsets: its request ids are
  exactly what the broker acknowledged. Those not yet stored by the scorer at that moment are "at risk"; the ones
  never stored in the end are the broker's loss, reported apart. Every other missing request is the platform's.
PASS needs: platform losses 0, duplicates 0, opted-out stored 0, every poison message dead-lettered, no 5xx but
503 sent while serving was restarting, the champion unchanged by a killed night and the rerun resumed.

    .venv/bin/python bench/reliability.py                         # K=4 req/s, 2 min (+ the faults), 30 s outages
    .venv/bin/python bench/reliability.py --rps 2 --minutes 1 --outage-s 5 --faults broker_pause,scorer_kill
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import openai
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from message_bus.topics import consumer_config, ensure_topics, producer_config  # noqa: E402
from schemas.trajectory import DEAD_LETTER_TOPIC, DEFAULT_TOPIC  # noqa: E402
from shadow_distill import stack  # noqa: E402
from shadow_distill.faults import TcpProxy, frozen  # noqa: E402

FAULTS = ("poison", "broker_pause", "scorer_kill", "db_outage", "serving_term", "serving_kill", "serving_kill_loaded",
          "broker_restart")
KILLS = ("serving_kill", "serving_kill_loaded")
KILL_RPS, KILL_RAMP_S = 8.0, 4.0  # serving_kill_loaded: the load it is killed under, and for how long before
PG_ADMIN = os.environ.get("SHADOW_DISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
API_KEY, ADMIN_TOKEN = "sk-rel-" + uuid.uuid4().hex, "adm-rel-" + uuid.uuid4().hex
SERVING_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
SCORER_ENV = {"OMP_NUM_THREADS": "1"}


@dataclass(frozen=True)
class BenchConfig:
    rps: float = 4.0
    minutes: float = 2.0
    faults: tuple[str, ...] = FAULTS
    outage_s: float = 30.0
    gap_s: float = 8.0
    max_tokens: int = 8
    opt_out_every: int = 10
    nightly: bool = True
    coverage_timeout_s: float = 300.0
    workdir: Path = Path("runs/reliability")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.faults) - set(FAULTS))
        if unknown or self.rps <= 0 or self.minutes <= 0 or self.outage_s <= 0:
            raise ValueError(f"bad config: unknown faults {unknown}, rps {self.rps}, minutes {self.minutes}, "
                             f"outage_s {self.outage_s} (faults are {', '.join(FAULTS)})")


@dataclass
class Outcome:
    request_id: str
    opted_out: bool
    sent_at: float
    done_at: float = 0.0
    status: str = "pending"  # "200", "503", ..., "conn" (refused/reset), "timeout"


@dataclass
class FaultRecord:
    name: str
    start: float
    end: float
    notes: dict = field(default_factory=dict)


# ---- traffic ---------------------------------------------------------------------------------------------------
class Load:
    """K requests/s (open loop) for `duration_s`, each with its own X-Request-Id."""

    def __init__(self, url: str, model: str, cfg: BenchConfig, run: str):
        self.client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
        self.model, self.cfg, self.run = model, cfg, run
        self.outcomes: list[Outcome] = []
        self.rps = cfg.rps  # a fault may raise it for a while
        self.stop_at = float("inf")
        self._pool = ThreadPoolExecutor(64)
        self._thread = threading.Thread(target=self._schedule, daemon=True)

    def start(self, duration_s: float) -> Load:
        self.t0 = time.monotonic()
        self.stop_at = self.t0 + duration_s
        self._thread.start()
        return self

    def _schedule(self) -> None:
        i, due = 0, self.t0
        while due < self.stop_at:
            time.sleep(max(0.0, due - time.monotonic()))
            out = Outcome(f"rel-{self.run}-{i:05d}", i % self.cfg.opt_out_every == self.cfg.opt_out_every - 1,
                          time.monotonic())
            self.outcomes.append(out)
            self._pool.submit(self._one, out, i)
            i += 1
            due += 1 / self.rps

    def _one(self, out: Outcome, i: int) -> None:
        headers = {"X-Request-Id": out.request_id, **({"X-Shadow-Log": "off"} if out.opted_out else {})}
        try:
            self.client.chat.completions.create(
                model=self.model, messages=[{"role": "user", "content": f"Tell me about item {i}."}],
                max_tokens=self.cfg.max_tokens, temperature=1.0, seed=i, extra_headers=headers)
            out.status = "200"
        except openai.APIStatusError as exc:
            out.status = str(exc.status_code)
        except openai.APITimeoutError:
            out.status = "timeout"
        except openai.APIConnectionError:
            out.status = "conn"
        out.done_at = time.monotonic()

    def join(self) -> None:
        self._thread.join()
        self._pool.shutdown(wait=True)


class Tap:
    """A group-less consumer of the trajectory topic and the DLQ: what the broker holds, as request ids."""

    def __init__(self, bootstrap: str, secrets: list[bytes]):
        self.bootstrap, self.secrets = bootstrap, secrets
        self.topic_ids: Counter[str] = Counter()  # request id -> copies seen on the topic (all broker lives)
        self.dlq_keys: list[str] = []
        self.dlq_ids: set[str] = set()  # request ids of real trajectories that were dead-lettered
        self.secret_hits = 0
        self.ends: dict[tuple[str, int], int] = {}
        self._seen: set[tuple[int, str, int, int]] = set()  # (broker life, topic, partition, offset)
        self._life = 0
        self._last_read = time.monotonic()
        self._reset = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Tap:
        self._thread.start()
        return self

    def _consumer(self):
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(**consumer_config(self.bootstrap, None, client_id="reliability-tap"))
        tps = [TopicPartition(t, p) for t in (DEFAULT_TOPIC, DEAD_LETTER_TOPIC)
               for p in sorted(consumer.partitions_for_topic(t) or {0})]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        self.ends = {}
        return consumer

    def _run(self) -> None:
        consumer = None
        while not self._stop.is_set():
            try:
                if consumer is None or self._reset.is_set():
                    if consumer is not None:
                        consumer.close()
                    if self._reset.is_set():
                        self._life += 1
                    self._reset.clear()
                    consumer = self._consumer()
                for tp, messages in consumer.poll(timeout_ms=200).items():
                    self._last_read = time.monotonic()
                    for m in messages:
                        if (self._life, tp.topic, tp.partition, m.offset) not in self._seen:
                            self._seen.add((self._life, tp.topic, tp.partition, m.offset))
                            self._record(tp.topic, m)
                        self.ends[(tp.topic, tp.partition)] = m.offset + 1
            except Exception:  # noqa: BLE001 - the broker is frozen or restarting: rebuild and go on
                consumer = None
                time.sleep(0.5)
        if consumer is not None:
            consumer.close()

    def _record(self, topic: str, m) -> None:
        value = m.value or b""
        self.secret_hits += sum(s in value for s in self.secrets)
        if topic == DEAD_LETTER_TOPIC:
            self.dlq_keys.append((m.key or b"").decode(errors="replace"))
            with contextlib.suppress(ValueError, KeyError, TypeError):
                self.dlq_ids.add(json.loads(value)["request_id"])
            return
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self.topic_ids[json.loads(value)["request_id"]] += 1

    def caught_up(self, timeout_s: float = 30.0, quiet_s: float = 1.5) -> bool:
        """Wait until the tap has read up to the topic's current end offsets and then nothing for `quiet_s`.

        Tansu reports a partition's end offset as its last batch's base offset + 1, so reaching the end offsets
        can leave the rest of that batch unread; with its producers frozen, a quiet tap has read everything."""
        from kafka import KafkaConsumer, TopicPartition

        probe = KafkaConsumer(**consumer_config(self.bootstrap, None, client_id="reliability-probe"))
        try:
            tps = [TopicPartition(DEFAULT_TOPIC, p) for p in sorted(probe.partitions_for_topic(DEFAULT_TOPIC) or {0})]
            ends = probe.end_offsets(tps)
        finally:
            probe.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if (all(self.ends.get((tp.topic, tp.partition), 0) >= end for tp, end in ends.items())
                    and time.monotonic() - self._last_read >= quiet_s):
                return True
            time.sleep(0.05)
        return False

    def reset(self) -> None:
        self._reset.set()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# ---- the store ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fresh_database():
    """A new database on the shared PostgreSQL server (as tests/conftest.py's `pg_url`), dropped afterwards."""
    name = f"sd_rel_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as c:
            c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def db_url(name: str, port: int = 5432) -> str:
    return PG_ADMIN.rsplit("@", 1)[0] + f"@127.0.0.1:{port}/{name}"


def stored_rows(engine: sa.Engine) -> tuple[Counter[str], set[str], list[bytes]]:
    """(rows per request id, request ids with a teacher score, texts to grep for secrets)."""
    with engine.connect() as c:
        rows = c.execute(sa.text("SELECT request_id, coalesce(prompt_text, '') || coalesce(completion_text, '') || "
                                 "coalesce(caller_hash, '') FROM trajectories")).all()
        scored = {r[0] for r in c.execute(sa.text(
            "SELECT t.request_id FROM trajectories t JOIN teacher_scores s USING (trajectory_id)"))}
    return Counter(r[0] for r in rows), scored, [r[1].encode() for r in rows]


# ---- services ------------------------------------------------------------------------------------------------
def restart(sup: stack.Supervisor, name: str, sig: int, env: dict[str, str], health: str | None) -> float:
    """Stop a service with `sig` (SIGTERM: graceful, SIGKILL: crash), start the same command; return seconds down."""
    rec = sup.records()[name]
    t0 = time.monotonic()
    if sig == signal.SIGKILL:
        with contextlib.suppress(ProcessLookupError):  # it may have exited on its own already
            sup.signal(name, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(rec.pid, 0)
    sup.stop(name, grace_s=60)
    sup.start(name, rec.cmd, port=rec.port, env=env, health_url=health, timeout_s=300)
    return time.monotonic() - t0


def shadow_stats(url: str) -> dict[str, float]:
    import httpx

    try:
        text = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    return {k.removeprefix("shadow_log_"): float(v) for k, v in
            (line.split() for line in text.splitlines() if line.startswith("shadow_log_"))}


class Watchdog:
    """Restarts the scorer when it exits on its own, as Kubernetes would restart a crashed pod; counts it.

    The scorer CLI exits when Kafka or the database is unreachable while it starts (`ScoringService.open`,
    `FeatureStore.open`); the stack's Supervisor does not restart anything, so without this one early crash
    would stop all scoring and hide every later result."""

    def __init__(self, sup: stack.Supervisor, lock: threading.Lock):
        self.sup, self.lock, self.restarts = sup, lock, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(2.0):
            with self.lock:
                rec = self.sup.records().get("scorer")
                if rec is not None and not self.sup.alive(rec):
                    print(f"  watchdog: the scorer exited; restarting it (see {rec.log})", flush=True)
                    self.restarts += 1
                    restart(self.sup, "scorer", signal.SIGKILL, SCORER_ENV, None)


def warm_up(engine: sa.Engine, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not stored_rows(engine)[1]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing was scored within {timeout_s:.0f} s of starting the load")
        time.sleep(1.0)


# ---- faults ----------------------------------------------------------------------------------------------------
class Faults:
    def __init__(self, sup, bootstrap, serving_url, proxy, tap, engine, cfg):
        self.sup, self.bootstrap, self.serving, self.proxy = sup, bootstrap, serving_url, proxy
        self.tap, self.engine, self.cfg = tap, engine, cfg
        self.records: list[FaultRecord] = []
        self.poison_keys: list[str] = []
        self.at_risk: set[str] = set()  # acknowledged by the broker, not yet stored, at the broker kill
        self.load: Load | None = None  # set once the load runs (serving_kill_loaded raises its rate)
        self.lock = threading.Lock()  # held while a fault restarts a service (the watchdog keeps off)

    def run(self, name: str) -> FaultRecord:
        rec = FaultRecord(name, time.monotonic(), 0.0)
        with self.lock:
            rec.notes = getattr(self, name)() or {}
        rec.end = time.monotonic()
        self.records.append(rec)
        print(f"  fault {name:<15} {rec.end - rec.start:6.1f} s  {rec.notes}", flush=True)
        return rec

    def poison(self) -> dict:
        from kafka import KafkaProducer

        bad = [b"not json at all", b'{"schema_version": 1, "request_id": "poison"}', b"\xff\xfe\x00",
               json.dumps({"schema_version": 99}).encode()]
        producer = KafkaProducer(**producer_config(self.bootstrap, client_id="reliability-poison"))
        self.poison_keys = [f"poison-{uuid.uuid4().hex[:8]}" for _ in bad]
        for key, value in zip(self.poison_keys, bad, strict=True):
            producer.send(DEFAULT_TOPIC, key=key.encode(), value=value).get(timeout=10)
        producer.close()
        return {"sent": len(bad)}

    def broker_pause(self) -> dict:
        with frozen(self.sup, "broker"):
            time.sleep(self.cfg.outage_s)
        return {"frozen_s": self.cfg.outage_s}

    def scorer_kill(self) -> dict:
        return {"down_s": round(restart(self.sup, "scorer", signal.SIGKILL, SCORER_ENV, None), 1)}

    def db_outage(self) -> dict:
        self.proxy.cut()
        time.sleep(self.cfg.outage_s)
        self.proxy.restore()
        return {"cut_s": self.cfg.outage_s}

    def serving_term(self) -> dict:
        before = shadow_stats(self.serving)
        down = restart(self.sup, "serving", signal.SIGTERM, SERVING_ENV, f"{self.serving}/health")
        return {"down_s": round(down, 1), "accepted_before": before.get("accepted")}

    def serving_kill(self) -> dict:
        before = shadow_stats(self.serving)  # what the in-memory queue held a moment before the kill
        down = restart(self.sup, "serving", signal.SIGKILL, SERVING_ENV, f"{self.serving}/health")
        return {"down_s": round(down, 1), "queue_depth_before": before.get("queue_depth"),
                "inflight_before": before.get("inflight"), "spool_pending_before": before.get("spool_pending")}

    def serving_kill_loaded(self) -> dict:
        """SIGKILL serving while it answers KILL_RPS requests/s: every request answered before the kill must be
        stored (the shadow log's write-ahead log holds what its memory queue held)."""
        assert self.load is not None
        normal, self.load.rps = self.load.rps, KILL_RPS
        try:
            time.sleep(KILL_RAMP_S)
            killed_at = time.monotonic()
            notes = self.serving_kill()
        finally:
            self.load.rps = normal
        return {**notes, "rps": KILL_RPS, "killed_at": killed_at}

    def broker_restart(self) -> dict:
        rec = self.sup.records()["broker"]
        with frozen(self.sup, "serving"):  # nothing new produced or acknowledged while we look
            caught_up = self.tap.caught_up()
            acked = set(self.tap.topic_ids)
            stored_now = set(stored_rows(self.engine)[0])
            self.at_risk = acked - stored_now - self.tap.dlq_ids  # dead-lettered ones are the platform's loss
            self.sup.signal("broker", signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(rec.pid, 0)
            self.sup.stop("broker")
            self.sup.start("broker", rec.cmd, port=rec.port)
            ensure_topics(self.bootstrap, {DEFAULT_TOPIC: 4, DEAD_LETTER_TOPIC: 1})
        self.tap.reset()
        return {"tap_caught_up": caught_up, "acked_before_kill": len(acked), "at_risk": len(self.at_risk)}


# ---- the nightly run, killed mid-training --------------------------------------------------------------------
NIGHT_CODE = """
import json, logging, sys
from datetime import datetime
from nightly_train.config import NightlyConfig
from nightly_train.pipeline import Night, train
logging.basicConfig(level=logging.INFO)
night = Night(NightlyConfig.from_json_file(sys.argv[1]), datetime.fromisoformat(sys.argv[2]),
              datetime.fromisoformat(sys.argv[3]))
print("RESULT " + json.dumps(train(night).to_xcom()), flush=True)
"""


def train_process(cfg_path: Path, start: datetime, end: datetime, log_path: Path) -> subprocess.Popen:
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-c", NIGHT_CODE, str(cfg_path), start.isoformat(), end.isoformat()],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def train_result(log_path: Path) -> dict:
    lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"nightly train printed no result; see {log_path}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def nightly_check(cfg_path: Path, start: datetime, mid: datetime, end: datetime, workdir: Path) -> dict:
    """Night A seeds a champion; night B's training is SIGKILLed after a checkpoint, then rerun to the end."""
    from model_registry.registry import Registry
    from nightly_train import pipeline
    from nightly_train.config import NightlyConfig
    from nightly_train.results import GateOutcome

    cfg = NightlyConfig.from_json_file(cfg_path)
    night_a, night_b = pipeline.Night(cfg, start, mid), pipeline.Night(cfg, mid, end)
    reg = Registry(cfg.mlflow_tracking_uri, cfg.registered_model())

    def aliases() -> dict:
        return {a: (v.version if (v := reg.alias(a)) else None) for a in ("champion", "candidate", "previous")}

    pipeline.snapshot(night_a)
    log_a = workdir / "night-a.log"
    train_process(cfg_path, start, mid, log_a).wait(900)
    # The seed champion skips the gate on purpose: this bench tests faults, not the quality gate.
    seeded = GateOutcome(interval_key=night_a.key, run_id=train_result(log_a)["run_id"], passed=True, tags={},
                         table="seeded by the reliability bench")
    seed = pipeline.register(night_a, seeded)
    reg.approve(seed.version, "bench-reviewer")
    before = aliases()

    pipeline.snapshot(night_b)
    folder = night_b.layout.train_dir
    log_b = workdir / "night-b.log"
    proc = train_process(cfg_path, mid, end, log_b)
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline and not _checkpoints(folder):
        time.sleep(0.02)
    killed_mid = proc.poll() is None
    killed_after = max(_checkpoints(folder), default=0)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    after_kill = aliases()
    rerun = train_process(cfg_path, mid, end, log_b)
    rerun_rc = rerun.wait(900)
    history_path = night_b.layout.history_file
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    tail = [ln for ln in log_b.read_text(errors="replace").splitlines() if ln.strip()][-1:]
    return {"rerun_error": None if rerun_rc == 0 else (tail[0][:300] if tail else "?"), "seed_version": seed.version, "aliases_before": before, "aliases_after_kill": after_kill,
            "aliases_after_rerun": aliases(), "killed_mid_training": killed_mid, "checkpoint_at_kill": killed_after,
            "rerun_rc": rerun_rc, "rerun_first_step": history[0]["step"] if history else None,
            "rerun_steps": train_result(log_b)["steps"] if rerun_rc == 0 else None}


def _checkpoints(folder: Path) -> list[int]:
    from nightly_train.layout import checkpoints_dir

    root = checkpoints_dir(folder)
    return [int(p.name.split("-")[1]) for p in root.glob("step-*") if not p.name.endswith(".tmp")] if root.exists() else []


def mlflow_secret_hits(tracking_uri: str, secrets: list[str]) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    texts: list[str] = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            texts += [f"{k}={v}" for k, v in {**run.data.tags, **run.data.params}.items()]
    for model in client.search_registered_models():
        for mv in client.search_model_versions(f"name='{model.name}'"):
            texts += [f"{k}={v}" for k, v in mv.tags.items()]
    return sum(s in t for t in texts for s in secrets)


# ---- accounting (pure) ------------------------------------------------------------------------------------------
def account(outcomes: list[Outcome], stored: Counter, scored: set[str], at_risk: set[str],
            faults: list[FaultRecord], poison_keys: list[str], dlq_keys: list[str], dlq_ids: set[str]) -> dict:
    answered = [o for o in outcomes if o.status == "200"]
    expected = {o.request_id for o in answered if not o.opted_out}
    opted = {o.request_id for o in outcomes if o.opted_out}
    missing = expected - set(stored)
    broker_dropped = missing & at_risk
    kills = [f for f in faults if f.name in KILLS]
    in_kill_window = {o.request_id for o in answered if o.request_id in missing - broker_dropped
                      and any(k.start - 5.0 <= o.done_at <= k.notes.get("killed_at", k.start) for k in kills)}
    loaded = [(f.start, f.notes["killed_at"]) for f in faults if f.name == "serving_kill_loaded" and f.notes]
    answered_loaded = {o.request_id for o in answered if o.request_id in expected
                       and any(a <= o.done_at <= b for a, b in loaded)}
    down = [(f.start, f.end + 5.0) for f in faults if f.name in ("serving_term", *KILLS)]
    bad_5xx = [o for o in outcomes if o.status.isdigit() and int(o.status) >= 500
               and not (o.status == "503" and any(a <= o.sent_at <= b for a, b in down))]
    return {
        "sent": len(outcomes), "by_status": dict(sorted(Counter(o.status for o in outcomes).items())),
        "answered": len(answered), "answered_opted_out": len(expected.symmetric_difference(
            {o.request_id for o in answered})), "expected": len(expected),
        "stored": len(expected & set(stored)),
        "scored": len(expected & scored), "broker_at_risk": len(at_risk & expected),
        "broker_dropped": len(broker_dropped), "platform_lost": len(missing - broker_dropped),
        "platform_lost_in_serving_sigkill_window": len(in_kill_window),
        "sigkill_loaded_answered": len(answered_loaded),
        "sigkill_loaded_lost": len(answered_loaded & (missing - broker_dropped)),
        "platform_lost_dead_lettered": len((missing - broker_dropped) & dlq_ids),
        "duplicates": sum(1 for n in stored.values() if n > 1), "opted_out_stored": len(opted & set(stored)),
        "stored_not_answered": len(set(stored) - {o.request_id for o in answered}),
        "poison_sent": len(poison_keys), "dead_lettered": len(set(poison_keys) & set(dlq_keys)),
        "bad_5xx": len(bad_5xx), "lost_ids": sorted(missing - broker_dropped)[:20],
    }


def verdict(r: dict) -> tuple[bool, str]:
    reasons = []
    if r["platform_lost"]:
        reasons.append(f"{r['platform_lost']} answered requests never stored ({r['platform_lost_dead_lettered']} "
                       f"dead-lettered by the scorer, {r['platform_lost_in_serving_sigkill_window']} answered within "
                       "5 s before the serving SIGKILL)")
    for key, what in (("duplicates", "request ids stored twice"), ("opted_out_stored", "opted-out requests stored"),
                      ("bad_5xx", "5xx other than 503 while serving restarted")):
        if r[key]:
            reasons.append(f"{r[key]} {what}")
    if r["dead_lettered"] != r["poison_sent"]:
        reasons.append(f"{r['poison_sent'] - r['dead_lettered']} poison messages not dead-lettered")
    if r["secret_hits"]:
        reasons.append(f"{r['secret_hits']} raw secrets found in logs, topic, store or MLflow")
    if r["coverage_s"] is None:
        reasons.append("full coverage not reached in time")
    n = r.get("nightly")
    if n and n.get("error"):
        reasons.append(f"nightly check could not run: {n['error']}")
    elif n:
        if n["aliases_after_kill"] != n["aliases_before"] or n["aliases_after_rerun"]["champion"] != n["seed_version"]:
            reasons.append(f"champion moved by a failed night: {n['aliases_before']} -> {n['aliases_after_kill']}")
        if not n["killed_mid_training"] or n["rerun_first_step"] != n["checkpoint_at_kill"] + 1 or n["rerun_rc"]:
            reasons.append(f"nightly rerun did not resume from its checkpoint (killed after step "
                           f"{n['checkpoint_at_kill']}, rerun exit {n['rerun_rc']}: {n['rerun_error']})")
    if not r["answered"]:
        reasons.append("no request was answered")
    return not reasons, "; ".join(reasons) or "every answered, logged request stored exactly once"


def render(r: dict, cfg: BenchConfig) -> str:
    n = r.get("nightly") or {}
    n = {} if n.get("error") else n
    rows = [
        ("requests sent", f"{r['sent']} ({cfg.rps:g}/s, {r['load_s']:.0f} s)"),
        ("answered, by status", json.dumps(r["by_status"])),
        ("answered, opted out", r["answered_opted_out"]),
        ("expected in the store (answered, logged)", r["expected"]),
        ("trajectories logged (serving accepted, all lives)", r["logged"]),
        ("stored (expected request ids)", r["stored"]),
        ("scored by the teacher", r["scored"]),
        ("acked by the broker, unconsumed at its kill", r["broker_at_risk"]),
        ("dropped by the broker restart (Tansu, not platform)", r["broker_dropped"]),
        ("LOST by the platform", r["platform_lost"]),
        ("  of which dead-lettered by the scorer", r["platform_lost_dead_lettered"]),
        ("  of which answered <5 s before serving SIGKILL", r["platform_lost_in_serving_sigkill_window"]),
        (f"answered at {KILL_RPS:g}/s before a SIGKILL / of those LOST",
         f"{r['sigkill_loaded_answered']} / {r['sigkill_loaded_lost']}"),
        ("duplicates (request ids stored > 1; PK on trajectory_id)", r["duplicates"]),
        ("topic copies absorbed by the idempotent store", r["topic_copies_absorbed"]),
        ("opted-out requests stored", r["opted_out_stored"]),
        ("stored but not answered (client saw an error)", r["stored_not_answered"]),
        ("poison messages sent / dead-lettered", f"{r['poison_sent']} / {r['dead_lettered']}"),
        ("dead-lettered, all (poison + refused trajectories)", r["dlq_total"]),
        ("5xx other than 503 during serving restarts", r["bad_5xx"]),
        ("raw secrets in logs/topic/store/MLflow", r.get("secret_hits", "(checked after the nightly run)")),
        ("scorer exits restarted by the bench watchdog", r["scorer_crash_restarts"]),
        ("time to full coverage after the last fault", f"{r['coverage_s']:.1f} s" if r["coverage_s"] is not None else "NOT REACHED"),
        ("nightly killed after checkpoint / rerun started at step",
         f"{n.get('checkpoint_at_kill')} / {n.get('rerun_first_step')}" if n else "skipped"),
        ("champion before / after kill / after rerun", f"v{n.get('aliases_before', {}).get('champion')} / "
         f"v{n.get('aliases_after_kill', {}).get('champion')} / v{n.get('aliases_after_rerun', {}).get('champion')}"
         if n else "skipped"),
    ]
    faults = [f"{f['name']} {f['end'] - f['start']:.0f}s {f['notes']}" for f in r["faults"]]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["faults: " + "; ".join(faults), "-" * 100]
                     + [f"{k:<{width}}  {v}" for k, v in rows] + ["-" * 100])


# ---- the run ----------------------------------------------------------------------------------------------------
def wait_coverage(engine: sa.Engine, load: Load, faults: Faults, timeout_s: float) -> float | None:
    """When every expected request id is stored and scored (at-risk ones only if stored; dead-lettered ones
    are final, and counted as lost)."""
    expected = {o.request_id for o in load.outcomes if o.status == "200" and not o.opted_out}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stored, scored, _ = stored_rows(engine)
        need = ((expected - faults.at_risk) | (expected & set(stored))) - faults.tap.dlq_ids
        if need <= scored:
            return time.monotonic()
        time.sleep(1.0)
    return None


def run(cfg: BenchConfig) -> dict:
    from feature_store import FeatureStore
    from model_runtime.models import ModelMeta
    from nightly_train.config import NightlyConfig
    from shadow_distill.nightly_file import write_nightly_config
    from shadow_distill.models_setup import resolve_models

    workdir = (cfg.workdir / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")).resolve()
    workdir.mkdir(parents=True)
    teacher_dir, student_dir = resolve_models(tiny=True, workdir=workdir)
    sup = stack.Supervisor(workdir / "stack")
    os.environ["SHADOW_DISTILL_ADMIN_TOKEN"] = ADMIN_TOKEN  # serving inherits it: its logs must not show it
    secrets = [API_KEY, ADMIN_TOKEN]
    tap = watchdog = None
    with fresh_database() as db, TcpProxy("127.0.0.1", 5432) as proxy:
        engine = sa.create_engine(db_url(db))
        try:
            FeatureStore.open(db_url(db))  # migrate before the scorer starts
            bootstrap, mlflow_uri = stack.start_broker(sup), stack.start_mlflow(sup)
            ensure_topics(bootstrap, {DEFAULT_TOPIC: 4, DEAD_LETTER_TOPIC: 1})
            cfg_path = write_nightly_config(workdir, db_url(db), mlflow_uri, teacher_dir, student_dir, tiny=True,
                                            train={"max_steps": 30, "checkpoint_every": 2, "batch_size": 2})
            serving = stack.start_serving(sup, student_dir, bootstrap, mlflow_uri,
                                          NightlyConfig.from_json_file(cfg_path).registered_model(), API_KEY)
            stack.start_scorer(sup, bootstrap, db_url(db, proxy.port), teacher_dir, student_dir)
            tap = Tap(bootstrap, [s.encode() for s in secrets]).start()
            faults = Faults(sup, bootstrap, serving, proxy, tap, engine, cfg)
            watchdog = Watchdog(sup, faults.lock)
            wall_start = datetime.now(UTC) - timedelta(seconds=1)
            load = Load(serving, ModelMeta.read(student_dir).model_id, cfg, uuid.uuid4().hex[:6]).start(
                cfg.minutes * 60)
            faults.load = load
            print(f"load: {cfg.rps:g} req/s; faults: {', '.join(cfg.faults)}; run folder {workdir}", flush=True)
            warm_up(engine, timeout_s=300)  # the scorer is up and scoring before the first fault
            watchdog.start()
            load.stop_at = float("inf")  # the load runs through every fault
            time.sleep(cfg.gap_s)
            for name in cfg.faults:
                faults.run(name)
                time.sleep(cfg.gap_s)
            last_fault_end = faults.records[-1].end if faults.records else load.t0
            load.stop_at = max(load.t0 + cfg.minutes * 60, time.monotonic() + cfg.gap_s)
            load.join()
            load_s = time.monotonic() - load.t0
            wall_end = datetime.now(UTC) + timedelta(seconds=1)
            covered_at = wait_coverage(engine, load, faults, cfg.coverage_timeout_s)
            time.sleep(2.0)  # let the tap read the last messages
            stored, scored, texts = stored_rows(engine)
            result = account(load.outcomes, stored, scored, faults.at_risk, faults.records, faults.poison_keys,
                             tap.dlq_keys, tap.dlq_ids)
            result.update(load_s=load_s, dlq_total=len(tap.dlq_keys), logged=len(set(tap.topic_ids) | set(stored)),
                          topic_copies_absorbed=sum(n - 1 for n in tap.topic_ids.values() if n > 1),
                          coverage_s=None if covered_at is None else covered_at - last_fault_end,
                          faults=[asdict(f) for f in faults.records], workdir=str(workdir))
            watchdog.stop()
            result["scorer_crash_restarts"] = watchdog.restarts
            print(render(result, cfg), flush=True)  # the traffic part, before the (slow) nightly check
            if cfg.nightly:
                mid = wall_start + (wall_end - wall_start) / 2
                try:
                    result["nightly"] = nightly_check(cfg_path, wall_start, mid, wall_end, workdir)
                except Exception as exc:  # noqa: BLE001 - a broken night is a result, not a crash of the bench
                    result["nightly"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            logs = b"".join(p.read_bytes() for p in (workdir / "stack" / "logs").glob("*.log"))
            result["secret_hits"] = (tap.secret_hits + sum(s.encode() in logs for s in secrets)
                                     + sum(s.encode() in t for t in texts for s in secrets)
                                     + mlflow_secret_hits(mlflow_uri, secrets))
        finally:
            if watchdog is not None:
                watchdog.stop()
            if tap is not None:
                tap.stop()
            sup.stop_all()
            engine.dispose()
    return result


def parse_args(argv: list[str] | None = None) -> tuple[BenchConfig, Path | None]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rps", type=float, default=4.0, help="requests per second (open loop)")
    p.add_argument("--minutes", type=float, default=2.0, help="load duration (extended until the faults are over)")
    p.add_argument("--faults", default=",".join(FAULTS), help=f"comma list, in order, of: {', '.join(FAULTS)}")
    p.add_argument("--outage-s", type=float, default=30.0, help="broker freeze and database cut length")
    p.add_argument("--gap-s", type=float, default=8.0, help="normal load between faults")
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--no-nightly", action="store_true", help="skip the killed-night check")
    p.add_argument("--coverage-timeout-s", type=float, default=300.0)
    p.add_argument("--workdir", type=Path, default=Path("runs/reliability"))
    p.add_argument("--json-out", type=Path, default=None, help="also write the result as JSON here")
    a = p.parse_args(argv)
    faults = tuple(f for f in a.faults.split(",") if f)
    return BenchConfig(rps=a.rps, minutes=a.minutes, faults=faults, outage_s=a.outage_s, gap_s=a.gap_s,
                       max_tokens=a.max_tokens, nightly=not a.no_nightly, coverage_timeout_s=a.coverage_timeout_s,
                       workdir=a.workdir), a.json_out


def main(argv: list[str] | None = None) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    cfg, json_out = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a killed bench still stops its services
    result = run(cfg)
    ok, reason = verdict(result)
    result.update(passed=ok, reason=reason)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=1, default=str))
    print(render(result, cfg))
    print(f"{'PASS' if ok else 'FAIL'}: {reason}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
