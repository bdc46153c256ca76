"""Settings of the teacher scorer, validated once when the service starts.

Why a `StrictConfig` (a frozen pydantic model): the CLI, the Airflow DAG and the tests build the same settings from flags, env or JSON,
and a bad value (a negative token budget, an http teacher without its vocabulary size or tokenizer) should fail
at start-up with the field's name, not minutes later inside a Kafka callback.

    cfg = ScoringConfig(bootstrap_servers="127.0.0.1:9092", store_url="sqlite:///store.db",
                        teacher="~/.cache/shadow-distill/models/teacher", student_tokenizer="models/student")
    cfg = ScoringConfig(..., teacher="http://vllm:8000", teacher_model="smollm2-135m-instruct",
                        teacher_vocab_size=49152, teacher_tokenizer="/models/teacher")

Top-k is on by default (k = 20): production traffic is mostly greedy or low-temperature, where the sampled
token's logprob teaches little and the analytic loss over the teacher's top-k is what trains (DESIGN.md, rule 2).
It costs 4 + 8k bytes per completion token (164 at k = 20) instead of 4.
    cfg.consumer_settings()   # kwargs for kafka.KafkaConsumer
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from foundation.config import StrictConfig

from schemas.trajectory import DEAD_LETTER_TOPIC, DEFAULT_TOPIC

DEFAULT_TOPK = 20  # vLLM's default --max-logprobs, so an http teacher serves it without a flag


class ScoringConfig(StrictConfig):
    """Where to read trajectories, which teacher scores them, where the scores go, and how fast."""

    # ---- Kafka ------------------------------------------------------------------------------------------
    bootstrap_servers: str = Field(
        description="Comma-separated host:port list of Kafka brokers, e.g. '127.0.0.1:9092'.")
    topic: str = Field(DEFAULT_TOPIC, min_length=1, description="Topic the serving layer logs trajectories to.")
    dlq_topic: str = Field(DEAD_LETTER_TOPIC, min_length=1,
                           description="Dead-letter topic for messages that can never be scored.")
    group_id: str = Field("shadow-scoring", min_length=1,
                          description="Consumer group; scorers sharing it split the partitions.")
    client_id: str = Field("shadow-scoring", min_length=1, description="Kafka client id (shows up in broker logs).")
    auto_offset_reset: Literal["earliest", "latest"] = Field(
        "earliest", description="Where a group with no committed offset starts; 'earliest' loses nothing.")
    session_timeout_ms: int = Field(
        6_000, ge=1_000, description="Consumer-group session timeout; a join takes about half of it on Tansu.")
    max_poll_interval_ms: int = Field(
        300_000, ge=1_000, description="Longest allowed gap between polls (scoring + DB commit of one poll).")
    max_poll_records: int = Field(256, ge=1, description="Most messages taken per poll; one poll = one DB commit.")
    poll_timeout_ms: int = Field(1_000, ge=1, description="How long one poll waits for messages.")
    fetch_max_wait_ms: int = Field(100, ge=0, le=10_000, description=(
        "Longest a fetch waits at the broker for data (Kafka's default: 500). A ListOffsets request (the caught-up "
        "check) waits behind it on the same connection, so this bounds that stall; an idle scorer then sends "
        "1000/this fetches a second, which costs the broker nothing."))

    # ---- feature store ----------------------------------------------------------------------------------
    store_url: str = Field(min_length=1, description="SQLAlchemy URL of the feature store (sqlite or postgresql).")

    # ---- teacher ----------------------------------------------------------------------------------------
    teacher: str = Field(min_length=1, description=(
        "Either a local model folder (embedded teacher, scored in-process) or the base URL of an "
        "OpenAI-compatible server with vLLM's prompt_logprobs (http:// or https://)."))
    teacher_model: str | None = Field(None, description="Served model name; required for an http teacher.")
    teacher_vocab_size: int | None = Field(
        None, ge=1, description="Vocabulary size of an http teacher (the server does not report it).")
    teacher_api_key: str | None = Field(None, repr=False, description="Bearer token for an http teacher, if any.")
    teacher_timeout_s: float = Field(120.0, gt=0, description="HTTP timeout of one scoring request.")
    temperature: float = Field(1.0, gt=0, description="Embedded teacher only: score under softmax(logits / T).")
    device: str = Field("auto", description="Embedded teacher only: 'auto', 'cpu', 'cuda', 'cuda:1', ...")
    torch_threads: int | None = Field(None, ge=1, le=1_024, description=(
        "Embedded teacher only: CPU threads of its forward pass (torch.set_num_threads; unset: torch's default, "
        "all cores). Replicas sharing a host split the cores between them."))
    batch_tokens: int = Field(8_192, ge=1, description="Token budget of one teacher forward pass (padded).")
    topk: int = Field(DEFAULT_TOPK, ge=0, le=1_000, description=(
        "Also store the teacher's top-k per completion token (0: off). An http teacher needs vLLM's "
        "--max-logprobs >= topk."))
    student_tokenizer: str | None = Field(None, min_length=1, description=(
        "Folder holding the student's tokenizer (the student model folder). At start-up a teacher whose "
        "tokenizer fingerprint differs is refused. Unset: nothing is checked (scores still record the teacher's)."))
    teacher_tokenizer: str | None = Field(None, min_length=1, description=(
        "Folder holding the teacher's tokenizer; required for an http teacher (the server does not expose it). "
        "An embedded teacher uses its own folder's."))
    cross_tokenizer: bool = Field(False, description=(
        "The teacher is of another model family: re-render each trajectory in its chat template, score its own "
        "tokens, and store scores per student token over aligned spans (shadow_scoring.cross_tokenizer). Needs "
        "student_tokenizer; stores no top-k (another vocabulary). Unalignable trajectories are dead-lettered."))
    score_tokens_per_step: int = Field(32_768, ge=1, description=(
        "Prompt + completion tokens the scorer scores from its backlog per service step (after landing a poll); "
        "bounds a step's time so the group membership and landing keep up."))

    # ---- operations -------------------------------------------------------------------------------------
    metrics_port: int | None = Field(
        None, ge=0, le=65_535, description="Serve Prometheus /metrics on this port (0: any free port; None: off).")
    metrics_host: str = Field("127.0.0.1", description="Address the metrics server binds to ('0.0.0.0' in a pod).")
    retry_initial_s: float = Field(0.5, gt=0, description="First wait after the database or teacher fails.")
    retry_max_s: float = Field(30.0, gt=0, description="Longest wait between retries (exponential backoff).")
    connect_timeout_s: float = Field(30.0, gt=0, description=(
        "How long one attempt to reach the broker may take (kafka-python's bootstrap_timeout_ms)."))
    startup_wait_s: float = Field(300.0, ge=0, description=(
        "At start-up, how long to keep retrying an unreachable broker or database before giving up "
        "(0: fail at once). Lets the scorer start before its dependencies, as in a compose or k8s roll-out."))
    lag_refresh_s: float = Field(5.0, ge=0, description="How often consumer lag is measured (it costs a request).")
    idle_progress_s: float = Field(5.0, ge=0, description=(
        "While the log is idle, how often the scorer checks the end offsets and records that its partitions "
        "are caught up (the idle partitions' watermark advances by this step)."))

    @field_validator("bootstrap_servers")
    @classmethod
    def _servers(cls, v: str) -> str:
        hosts = [h.strip() for h in v.split(",") if h.strip()]
        bad = [h for h in hosts if ":" not in h]
        if not hosts or bad:
            raise ValueError(f"bootstrap_servers {v!r} must be a comma-separated list of host:port")
        return ",".join(hosts)

    @model_validator(mode="after")
    def _consistent(self) -> ScoringConfig:
        if self.topic == self.dlq_topic:
            raise ValueError(f"dlq_topic {self.dlq_topic!r} must differ from topic (poison would loop forever)")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError(f"retry_max_s {self.retry_max_s} is below retry_initial_s {self.retry_initial_s}")
        if self.max_poll_interval_ms < self.session_timeout_ms:
            raise ValueError(f"max_poll_interval_ms {self.max_poll_interval_ms} is below "
                             f"session_timeout_ms {self.session_timeout_ms}")
        if self.cross_tokenizer and self.student_tokenizer is None:
            raise ValueError("cross_tokenizer needs student_tokenizer: the student's tokenizer decodes its tokens")
        if self.teacher_is_http:
            missing = [f for f in ("teacher_model", "teacher_vocab_size", "teacher_tokenizer")
                       if getattr(self, f) is None]
            if missing:
                raise ValueError(f"teacher {self.teacher!r} is a server URL: set {' and '.join(missing)}")
            if self.temperature != 1.0:
                raise ValueError(f"temperature {self.temperature} needs the embedded teacher: a server's "
                                 "prompt_logprobs are the raw distribution (temperature 1)")
        return self

    @property
    def stored_topk(self) -> int:
        """The top-k actually stored: none for a cross-tokenizer teacher (its vocabulary is not the student's)."""
        return 0 if self.cross_tokenizer else self.topk

    @property
    def teacher_is_http(self) -> bool:
        return self.teacher.startswith(("http://", "https://"))

    def consumer_settings(self) -> dict[str, Any]:
        """kwargs for `kafka.KafkaConsumer` (`message_bus.topics` defaults): manual commits, so offsets move
        only after the DB commit; the heartbeat follows the session timeout."""
        from message_bus.topics import consumer_config

        return consumer_config(
            self.bootstrap_servers, self.group_id, client_id=self.client_id, auto_offset_reset=self.auto_offset_reset,
            session_timeout_ms=self.session_timeout_ms, max_poll_interval_ms=self.max_poll_interval_ms,
            max_poll_records=self.max_poll_records, bootstrap_timeout_ms=int(self.connect_timeout_s * 1000),
            fetch_max_wait_ms=self.fetch_max_wait_ms,
        )

    def producer_settings(self) -> dict[str, Any]:
        """kwargs for the dead-letter `kafka.KafkaProducer`: acks=all, idempotent (`message_bus.topics`)."""
        from message_bus.topics import producer_config

        return producer_config(self.bootstrap_servers, client_id=f"{self.client_id}-dlq",
                               bootstrap_timeout_ms=int(self.connect_timeout_s * 1000))
