"""Kafka client settings and topic creation: the one place they live.

Every part that talks to Kafka builds its client from these functions, so timeouts, durability and group
settings are chosen once:

    from kafka import KafkaConsumer, KafkaProducer
    from message_bus.topics import consumer_config, ensure_topics, producer_config

    ensure_topics("127.0.0.1:9092", {"shadow.trajectories.v1": 6})     # idempotent
    producer = KafkaProducer(**producer_config("127.0.0.1:9092"))
    consumer = KafkaConsumer("shadow.trajectories.v1", **consumer_config("127.0.0.1:9092", "shadow-scoring"))

Why these values:
- Producer: `acks="all"` + idempotence, so a retried batch is written once and per-partition order holds.
  Timeouts are seconds, not Kafka's minutes: serving must notice a dead or frozen broker quickly and spill to
  its local spool (`serving.shadow_log`) instead of holding records in memory. `send()` can still block up to
  `max_block_ms` (metadata, buffer), which is why serving calls it from a background thread only.
- Consumer: offsets are committed by hand after the work is durable (`enable_auto_commit=False`), a new group
  starts from the beginning of the topic, and `session_timeout_ms=6000` because a group join on the dev broker
  (Tansu) takes about half the session timeout (23 s at Kafka's default 45 s).
- Topics: Tansu supports CreateTopics but not CreatePartitions, so a topic's partition count is fixed at
  creation; `ensure_topics` creates what is missing and only warns about a count that differs.
- Partitions of the trajectory topic: the most scorer replicas that can work at once (a consumer group gives
  each partition to one member), so choose it for the largest scorer fleet expected, at creation:
  `ensure_trajectory_topics(bootstrap, partitions)`, or `SHADOW_DISTILL_TOPIC_PARTITIONS`, or
  `python -m message_bus.topics --bootstrap-servers HOST:PORT --partitions 12` (what a deployment's
  init step runs; infra/k8s declares its KafkaTopic with 12). A topic a producer auto-creates gets the
  broker's default instead (4 on Tansu, `num.partitions`, default 1, on Apache Kafka).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Any

from foundation.errors import ConfigError, ShadowDistillError
from schemas.trajectory import DEAD_LETTER_TOPIC, DEFAULT_TOPIC

log = logging.getLogger(__name__)

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
_TOPIC_ALREADY_EXISTS = 36

PRODUCER_DEFAULTS: dict[str, Any] = {
    "client_id": "shadow-distill-producer",
    "acks": "all",
    "enable_idempotence": True,
    "retries": 2_147_483_647,  # bounded by delivery_timeout_ms, as the Java client does
    "linger_ms": 5,
    "batch_size": 64 * 1024,
    "max_in_flight_requests_per_connection": 5,  # the most idempotence allows while keeping order
    "request_timeout_ms": 3_000,
    "delivery_timeout_ms": 10_000,
    "max_block_ms": 2_000,
    "bootstrap_timeout_ms": 3_000,
    "retry_backoff_ms": 100,
    "reconnect_backoff_max_ms": 1_000,
}

SESSION_TIMEOUT_MS = 6_000

PARTITIONS_ENV = "SHADOW_DISTILL_TOPIC_PARTITIONS"
DEFAULT_PARTITIONS = 4  # the demo's and the dev broker's; production declares its own (infra/k8s: 12)

CONSUMER_DEFAULTS: dict[str, Any] = {
    "client_id": "shadow-distill-consumer",
    "enable_auto_commit": False,
    "auto_offset_reset": "earliest",
    "session_timeout_ms": SESSION_TIMEOUT_MS,
    "heartbeat_interval_ms": SESSION_TIMEOUT_MS // 3,
    "request_timeout_ms": 10_000,
    "bootstrap_timeout_ms": 10_000,
    "reconnect_backoff_max_ms": 1_000,
}

ADMIN_DEFAULTS: dict[str, Any] = {
    "client_id": "shadow-distill-admin",
    "request_timeout_ms": 10_000,
    "bootstrap_timeout_ms": 5_000,
}


def _check_bootstrap(bootstrap: str) -> None:
    if not isinstance(bootstrap, str) or not bootstrap.strip():
        raise ConfigError(f"bootstrap must be 'host:port[,host:port]', got {bootstrap!r}")


def _check_known(kind: str, overrides: dict[str, Any], known: dict[str, Any]) -> None:
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(f"unknown {kind} setting(s) {unknown}: not a kafka-python {kind} config")


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """kwargs for `kafka.KafkaProducer`: durable (acks=all, idempotent), fails over in seconds."""
    from kafka import KafkaProducer

    _check_bootstrap(bootstrap)
    _check_known("producer", overrides, KafkaProducer.DEFAULT_CONFIG)
    config = {"bootstrap_servers": bootstrap, **PRODUCER_DEFAULTS, **overrides}
    if config["enable_idempotence"] and config["acks"] not in ("all", -1):
        raise ConfigError(f"acks={config['acks']!r} with enable_idempotence=True: idempotence needs acks='all'")
    if config["delivery_timeout_ms"] < config["request_timeout_ms"] + config["linger_ms"]:
        raise ConfigError(
            f"delivery_timeout_ms={config['delivery_timeout_ms']} must be >= request_timeout_ms + linger_ms "
            f"({config['request_timeout_ms']} + {config['linger_ms']})"
        )
    return config


def consumer_config(bootstrap: str, group_id: str | None, **overrides: Any) -> dict[str, Any]:
    """kwargs for `kafka.KafkaConsumer`: manual commits, earliest reset, a session Tansu can join quickly.

    `group_id=None` gives a group-less consumer (use `assign()`; nothing can be committed). When only
    `session_timeout_ms` is overridden the heartbeat follows it (a third of the session).
    """
    from kafka import KafkaConsumer

    _check_bootstrap(bootstrap)
    _check_known("consumer", overrides, KafkaConsumer.DEFAULT_CONFIG)
    if group_id is not None and not (isinstance(group_id, str) and group_id.strip()):
        raise ConfigError(f"group_id must be a non-empty string or None, got {group_id!r}")
    config = {"bootstrap_servers": bootstrap, "group_id": group_id, **CONSUMER_DEFAULTS, **overrides}
    if "session_timeout_ms" in overrides and "heartbeat_interval_ms" not in overrides:
        config["heartbeat_interval_ms"] = max(1, config["session_timeout_ms"] // 3)
    if config["heartbeat_interval_ms"] >= config["session_timeout_ms"]:
        raise ConfigError(
            f"heartbeat_interval_ms={config['heartbeat_interval_ms']} must be below "
            f"session_timeout_ms={config['session_timeout_ms']}"
        )
    return config


def admin_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """kwargs for `kafka.KafkaAdminClient`."""
    from kafka import KafkaAdminClient

    _check_bootstrap(bootstrap)
    _check_known("admin", overrides, KafkaAdminClient.DEFAULT_CONFIG)
    return {"bootstrap_servers": bootstrap, **ADMIN_DEFAULTS, **overrides}


def check_topic_name(name: str) -> None:
    """Raise `ConfigError` unless `name` is a legal Kafka topic name."""
    if not isinstance(name, str) or not _TOPIC_NAME.match(name) or name in (".", ".."):
        raise ConfigError(f"topic name {name!r} is not valid (1-249 characters of [A-Za-z0-9._-])")


def _check_topics(topics: dict[str, int], replication: int) -> None:
    if not topics:
        raise ConfigError("topics is empty: name at least one topic and its partition count")
    for name, partitions in topics.items():
        check_topic_name(name)
        if isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1:
            raise ConfigError(f"topic {name!r}: partitions must be an int >= 1, got {partitions!r}")
    if isinstance(replication, bool) or not isinstance(replication, int) or replication < 1:
        raise ConfigError(f"replication must be an int >= 1, got {replication!r}")


def ensure_topics(bootstrap: str, topics: dict[str, int], replication: int = 1, timeout_s: float = 10.0) -> list[str]:
    """Create each missing topic with its partition count; return the names created (idempotent).

    A topic that exists keeps its partition count (it cannot be changed on Tansu); a different count is logged
    as a warning. Raises `ShadowDistillError` when the broker cannot be reached or refuses a topic.
    """
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError, for_code

    _check_topics(topics, replication)
    if timeout_s <= 0:
        raise ConfigError(f"timeout_s must be > 0, got {timeout_s!r}")
    timeout_ms = int(timeout_s * 1000)
    try:
        admin = KafkaAdminClient(
            **admin_config(bootstrap, request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms)
        )
    except KafkaError as exc:
        raise ShadowDistillError(f"cannot reach Kafka at {bootstrap} to create topics: {exc}") from exc
    try:
        request = {name: {"num_partitions": n, "replication_factor": replication} for name, n in topics.items()}
        response = admin.create_topics(request, timeout_ms=timeout_ms, raise_errors=False)
        created, existing = [], []
        for result in response["topics"]:
            name, code = result["name"], result["error_code"]
            if code == 0:
                created.append(name)
            elif code == _TOPIC_ALREADY_EXISTS:
                existing.append(name)
            else:
                detail = result.get("error_message") or for_code(code).__name__
                raise ShadowDistillError(f"Kafka at {bootstrap} refused to create topic {name!r}: {detail}")
        if created:
            admin.wait_for_topics(created, timeout_ms=timeout_ms)
        if existing:
            _warn_partition_mismatch(admin, {name: topics[name] for name in existing})
        log.info("topics at %s: created %s, already there %s", bootstrap, created, existing)
        return created
    except KafkaError as exc:
        raise ShadowDistillError(f"creating topics {sorted(topics)} at {bootstrap} failed: {exc}") from exc
    finally:
        admin.close()


def _warn_partition_mismatch(admin: Any, wanted: dict[str, int]) -> None:
    for topic in admin.describe_topics(list(wanted)):
        have = len(topic.get("partitions") or [])
        if have != wanted[topic["name"]]:
            log.warning(
                "topic %r exists with %d partitions, not %d: left as is (partitions cannot be changed here)",
                topic["name"], have, wanted[topic["name"]],
            )


def trajectory_partitions(partitions: int | None = None) -> int:
    """The trajectory topic's partition count: `partitions`, else `SHADOW_DISTILL_TOPIC_PARTITIONS`, else 4."""
    if partitions is None:
        raw = os.environ.get(PARTITIONS_ENV, "").strip()
        try:
            partitions = int(raw) if raw else DEFAULT_PARTITIONS
        except ValueError:
            raise ConfigError(f"{PARTITIONS_ENV}={raw!r} is not a whole number of partitions") from None
    return partitions


def trajectory_topics(partitions: int | None = None, topic: str = DEFAULT_TOPIC,
                      dlq_topic: str = DEAD_LETTER_TOPIC) -> dict[str, int]:
    """{trajectory topic: its partitions (`trajectory_partitions`), dead-letter topic: 1} for `ensure_topics`.
    The dead-letter topic has one partition: it is read by people, in order, not by a group."""
    return {topic: trajectory_partitions(partitions), dlq_topic: 1}


def ensure_trajectory_topics(bootstrap: str, partitions: int | None = None, replication: int = 1,
                             topic: str = DEFAULT_TOPIC, dlq_topic: str = DEAD_LETTER_TOPIC) -> list[str]:
    """Create the trajectory and dead-letter topics where missing (idempotent); see `trajectory_topics`."""
    return ensure_topics(bootstrap, trajectory_topics(partitions, topic, dlq_topic), replication)


def main(argv: list[str] | None = None) -> int:
    """`python -m message_bus.topics --bootstrap-servers HOST:PORT [--partitions N] [--replication R]`."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m message_bus.topics",
                                 description="Create the trajectory and dead-letter topics where missing.")
    ap.add_argument("--bootstrap-servers", required=True)
    ap.add_argument("--partitions", type=int, default=None,
                    help=f"of the trajectory topic (default: ${PARTITIONS_ENV}, else {DEFAULT_PARTITIONS})")
    ap.add_argument("--replication", type=int, default=1)
    ap.add_argument("--topic", default=DEFAULT_TOPIC)
    ap.add_argument("--dlq-topic", default=DEAD_LETTER_TOPIC)
    args = ap.parse_args(argv)
    try:
        created = ensure_trajectory_topics(args.bootstrap_servers, args.partitions, args.replication,
                                           args.topic, args.dlq_topic)
    except ShadowDistillError as exc:
        print(f"python -m message_bus.topics: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"created": created, "topics": trajectory_topics(args.partitions, args.topic, args.dlq_topic)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
