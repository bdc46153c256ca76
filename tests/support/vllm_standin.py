"""The embedded server standing in for vLLM, configured as vLLM is: one API key for every /v1/* path.

vLLM's `--api-key` (`VLLM_API_KEY`) middleware guards every path under /v1 with that one key: completions,
models and the LoRA endpoints alike; /health stays open. So the stand-in takes the same key as API key and as
admin token. `StandIn.restart()` is a vLLM restart: a new process on the same port that has lost every adapter.
`raw_logprobs=True` makes it answer as a vLLM started without `--logprobs-mode processed_logprobs` does.

    with StandIn(student, adapters_root) as upstream:
        VLLMEngine(upstream.url, ..., api_key=STANDIN_KEY)
        upstream.restart()
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import httpx

from model_runtime.sampling import DecodeParams
from serving.api_server import BackgroundServer, build_app
from serving.config import ServingConfig
from serving.engine import EmbeddedEngine
from serving.engine_base import GenerationJob, GenerationOutput, RowRequest, RowResult
from serving.trajectories import MemorySink

STANDIN_KEY = "sk-upstream-123456"


def served_names(url: str, key: str = STANDIN_KEY) -> set[str]:
    """What the upstream lists on /v1/models: its base and every resident adapter (as vLLM lists them)."""
    response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
    response.raise_for_status()
    return {card["id"] for card in response.json()["data"]}


class RawLogprobsEngine:
    """An embedded engine answering as vLLM's default `--logprobs-mode raw_logprobs` does: tokens sampled at the
    requested temperature, each reported with its logprob under the model's own distribution (and alternatives
    from it). Streaming is passed through unchanged (the probe and the tests use whole responses)."""

    def __init__(self, inner: EmbeddedEngine):
        self.inner = inner

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def submit(self, rows: Sequence[RowRequest], on_token=None, **kwargs) -> GenerationJob:
        if on_token is not None:
            return self.inner.submit(rows, on_token, **kwargs)
        outer = GenerationJob(list(rows), None)
        threading.Thread(target=self._answer, args=(outer, kwargs), daemon=True).start()
        return outer

    def _answer(self, outer: GenerationJob, kwargs: dict) -> None:
        try:
            out = self.inner.submit(outer.rows, **kwargs).future.result(120)
            outer.future.set_result(GenerationOutput([self._raw(row, res, kwargs) for row, res in
                                                      zip(outer.rows, out.rows, strict=True)], out.adapter_version))
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request
            outer.future.set_exception(exc)

    def _raw(self, row: RowRequest, res: RowResult, kwargs: dict) -> RowResult:
        """`res` with every completion token's logprob (and alternatives) under the model's own distribution."""
        if not res.completion_ids:
            return res
        top = max(1, row.top_logprobs)
        score = RowRequest((*row.prompt_ids, *res.completion_ids), DecodeParams(max_tokens=1, temperature=0.0),
                           prompt_logprobs=top)
        entries = self.inner.submit([score], **kwargs).future.result(120).rows[0].prompt_logprobs
        start = len(row.prompt_ids)
        positions = [entries[start + j] for j in range(len(res.completion_ids))]
        logprobs = [pos[tok][0] for pos, tok in zip(positions, res.completion_ids, strict=True)]
        alternatives = [sorted(((t, lp) for t, (lp, _) in pos.items()), key=lambda x: -x[1])[:row.top_logprobs]
                        for pos in positions] if row.top_logprobs else None
        return RowResult(res.completion_ids, logprobs, res.logprob_kind, res.finish_reason, alternatives,
                         res.prompt_logprobs)


class StandIn:
    """The stand-in vLLM on a fixed port: an embedded engine behind the serving app, restartable."""

    def __init__(self, student: Path, adapters_root: Path, *, raw_logprobs: bool = False,
                 key: str = STANDIN_KEY):
        self.student, self.root, self.raw_logprobs, self.key = student, adapters_root, raw_logprobs, key
        self.sink = MemorySink()
        self.port: int | None = None
        self.engine: EmbeddedEngine | None = None
        self._server: BackgroundServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> StandIn:
        self.engine = EmbeddedEngine.from_dir(self.student, "cpu", batch_wait_ms=2)
        engine = RawLogprobsEngine(self.engine) if self.raw_logprobs else self.engine
        config = ServingConfig(model_dir=self.student, api_key=self.key, adapters_root=self.root, max_tokens_limit=64,
                               default_max_tokens=16, batch_wait_ms=2)
        app = build_app(config, engine, sink=self.sink, admin_token=self.key, caller_salt="s")
        self._server = BackgroundServer(app, port=self.port).__enter__()
        self.port = self._server.port
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.__exit__(None, None, None)
            self._server = None
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def restart(self) -> None:
        """As a vLLM process restarts: the same port, nothing loaded."""
        self.stop()
        self.start()

    def __enter__(self) -> StandIn:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
