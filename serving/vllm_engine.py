"""Gateway engine: the same serving API in front of a vLLM server, with exact token ids in every trajectory.

vLLM cannot share this virtualenv (it pins other torch/transformers versions), so it runs as its own server:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True VLLM_API_KEY=<key> \\
    vllm serve <student dir> --enable-lora --max-lora-rank 16 --max-loras 2 --logprobs-mode processed_logprobs

`--logprobs-mode processed_logprobs` makes the returned logprobs those of the distribution actually sampled
from (after temperature, top-k, top-p): the `sampled` behaviour logprobs the trainer's importance ratio needs.
For greedy requests vLLM returns the model's own logprobs, which is this project's `raw` kind. The gateway does
not take the flag on trust: at start-up, and again whenever vLLM restarted, it probes the mode
(`serving.vllm_logprobs`); under any other mode it logs no trajectory whose kind would be wrong and says so in
the log and on /health.

Auth: vLLM's `--api-key` / `VLLM_API_KEY` guards every `/v1/*` path (completions, models and the LoRA endpoints
alike) with one key, and leaves `/health` open. The gateway sends that key (`vllm_api_key`) on every call; the
gateway's own admin token (`$SHADOW_DISTILL_ADMIN_TOKEN`) guards the gateway's endpoints and never leaves it.

The gateway tokenizes itself (chat template, in the API layer), so it sends token-id prompts to vLLM's
`/v1/completions`, one request per choice (each with its own seed), asking for `logprobs`,
`return_tokens_as_token_ids` (tokens come back as `token_id:N`, the ids it logs) and `return_token_ids`
(vLLM >= 0.10; checked against the former when present). vLLM's own sampling extras (`min_p`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`, `prompt_logprobs`) go
through under vLLM's names, so both engines honour the same fields.

Adapters (`serving.vllm_adapters`): the default one (the champion) and named ones (vLLM multi-LoRA, `--max-loras`
must cover them) are loaded with `POST /v1/load_lora_adapter` under their version as `lora_name` (the path must be
readable by the vLLM server); a request for a named adapter sends `model=<name>`. An adapter is unloaded only once
nothing needs it, so a swap fails no request. A restarted vLLM has lost them: a health thread checks `/health` and
`GET /v1/models` every `health_interval_s` and reloads what is missing (`resync`); the champion watcher calls
`resync` on every poll too, and a request that gets 404 for its adapter resyncs once and retries. `is_alive()`
reads the health thread's last answer and never makes a request itself (the event loop calls it).

Background work (`submit(..., background=True)`, mirrored shadow requests) runs on a separate, small budget
(`background_concurrency` threads and HTTP connections, 4 by default): it can never take the connections of
client requests. vLLM itself schedules every request alike (first come, first served), so background requests
still share the GPU's batches; the budget bounds how much of it they take.

The embedded server exposes the same endpoints, which is how the contract test checks this client against it.

    python -m serving.api_server --engine vllm --vllm-url http://127.0.0.1:8001 --vllm-api-key <key> \\
        --model-dir <student dir>
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import httpx
from transformers import PreTrainedTokenizerBase

from model_runtime.models import ModelMeta, eos_token_ids, load_tokenizer
from serving.config import ServingConfig
from serving.engine_base import (
    AdapterInfo,
    EngineObserver,
    GenerationJob,
    GenerationOutput,
    PromptLogprobs,
    RowRequest,
    RowResult,
    TokenCallback,
)
from serving.vllm_adapters import AdapterResidency, VLLMAdmin
from serving.vllm_logprobs import PROBE_TEMPERATURE, PROBE_TEXT, LogprobMode, TrajectoryKindGuard, classify, \
    probe_requests
from foundation.errors import EngineError, ShadowDistillError

log = logging.getLogger(__name__)
TOKEN_ID_PREFIX = "token_id:"
HEALTH_TIMEOUT_S = 2.0


def parse_token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise ShadowDistillError(f"vLLM returned token {token!r:.40} without return_tokens_as_token_ids")
    return int(token[len(TOKEN_ID_PREFIX):])


def completion_body(row: RowRequest, model: str, stream: bool) -> dict:
    """The vLLM `/v1/completions` request for one choice; vLLM's own names for its sampling extras."""
    p = row.params
    body = {
        "model": model, "prompt": list(row.prompt_ids), "max_tokens": p.max_tokens, "temperature": p.temperature,
        "top_p": p.top_p, "top_k": p.top_k if p.top_k > 0 else -1, "seed": p.seed, "n": 1,
        "logprobs": max(1, row.top_logprobs), "return_tokens_as_token_ids": True, "return_token_ids": True,
        "stream": stream, "min_p": p.min_p, "min_tokens": p.min_tokens, "ignore_eos": p.ignore_eos,
        "stop_token_ids": list(p.stop_token_ids), "include_stop_str_in_output": row.include_stop_str,
        "skip_special_tokens": row.skip_special_tokens,
    }
    if row.stop:
        body["stop"] = list(row.stop)
    if row.prompt_logprobs is not None:
        body["prompt_logprobs"] = row.prompt_logprobs
    return body


def parse_prompt_logprobs(entries: list[dict | None]) -> PromptLogprobs:
    """vLLM's `prompt_logprobs` ({"<id>": {"logprob", "rank", "decoded_token"}} per position) as ids -> (lp, rank)."""
    return [None if e is None else {int(t): (float(v["logprob"]), v.get("rank")) for t, v in e.items()}
            for e in entries]


class _ChoiceParser:
    """Accumulates one choice from a full response or from stream chunks."""

    def __init__(self, row: RowRequest, on_token=None):
        self.row, self.on_token = row, on_token
        self.ids: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.returned_ids: list[int] | None = None
        self.finish_reason: str | None = None
        self.prompt_logprobs: PromptLogprobs | None = None

    def add(self, choice: dict) -> None:
        lp = choice.get("logprobs") or {}
        tokens, token_lps = lp.get("tokens") or [], lp.get("token_logprobs") or []
        tops = lp.get("top_logprobs") or [None] * len(tokens)
        if len(token_lps) != len(tokens) or len(tops) != len(tokens):
            raise ShadowDistillError(f"vLLM returned {len(tokens)} tokens, {len(token_lps)} logprobs")
        for token, token_lp, top in zip(tokens, token_lps, tops, strict=True):
            tok = parse_token_id(token)
            self.ids.append(tok)
            self.logprobs.append(float(token_lp))
            ranked = sorted(((parse_token_id(t), float(v)) for t, v in (top or {}).items()), key=lambda x: -x[1])
            self.top.append(ranked[: self.row.top_logprobs])
            if self.on_token is not None:
                self.on_token(tok, float(token_lp))
        if choice.get("token_ids") is not None:
            self.returned_ids = (self.returned_ids or []) + list(choice["token_ids"])
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        if choice.get("prompt_logprobs") is not None:
            self.prompt_logprobs = parse_prompt_logprobs(choice["prompt_logprobs"])

    def result(self) -> RowResult:
        if self.returned_ids is not None and self.returned_ids != self.ids:
            raise ShadowDistillError("vLLM token_ids disagree with the ids of its logprobs")
        if self.finish_reason not in ("stop", "length"):
            raise ShadowDistillError(f"vLLM finished a choice with {self.finish_reason!r}")
        kind = "raw" if self.row.params.temperature == 0 else "sampled"
        return RowResult(self.ids, self.logprobs, kind, self.finish_reason,
                         self.top if self.row.top_logprobs else None, self.prompt_logprobs)


class _AdapterMissing(ShadowDistillError):
    """vLLM answered 404 for the adapter a request named (it restarted and lost it)."""


@dataclass(frozen=True)
class _Lane:
    """Threads and HTTP connections of one kind of work: client requests, or background (mirrored) ones."""

    pool: ThreadPoolExecutor
    http: httpx.Client


class VLLMEngine:
    kind = "vllm"

    def __init__(self, base_url: str, tokenizer: PreTrainedTokenizerBase, base_model_id: str, served_model: str,
                 max_model_len: int, *, api_key: str | None = None, max_concurrency: int = 64,
                 background_concurrency: int = 4, timeout_s: float = 600.0, health_interval_s: float = 2.0,
                 observer: EngineObserver | None = None, transport: httpx.BaseTransport | None = None):
        """`api_key`: vLLM's `--api-key`, sent on every call. `transport`: tests only (an in-process vLLM)."""
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.base_model_id = base_model_id
        self.served_model = served_model
        self.max_model_len = max_model_len
        self.eos_ids = eos_token_ids(tokenizer)  # the serving layer's text rule (vLLM decides when to stop)
        self.observer = observer
        self.health_interval_s = health_interval_s
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._transport = transport
        self._client = _Lane(ThreadPoolExecutor(max_concurrency, thread_name_prefix="vllm-gateway"),
                             self._new_http(max_concurrency, timeout_s))
        self._background = _Lane(ThreadPoolExecutor(background_concurrency, thread_name_prefix="vllm-background"),
                                 self._new_http(background_concurrency, timeout_s))
        self._admin_http = self._new_http(2, 30.0)  # never waits behind saturated request connections
        self._admin_pool = ThreadPoolExecutor(1, thread_name_prefix="vllm-adapters")
        self.adapters = AdapterResidency(VLLMAdmin(self._admin_http))
        self.logprobs = LogprobMode()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._alive = True  # until the health thread's first answer says otherwise
        self._reprobe = False
        self._monitor = threading.Thread(target=self._watch_health, name="vllm-health", daemon=True)
        self._monitor.start()

    def _new_http(self, connections: int, timeout_s: float) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout_s,
                            limits=httpx.Limits(max_connections=connections), transport=self._transport)

    @classmethod
    def from_config(cls, config: ServingConfig, observer: EngineObserver | None = None) -> VLLMEngine:
        """The gateway for `config.vllm_url`: its limits read from vLLM, its logprob mode probed."""
        assert config.vllm_url is not None
        headers = {"Authorization": f"Bearer {config.vllm_api_key}"} if config.vllm_api_key else {}
        response = httpx.get(f"{config.vllm_url.rstrip('/')}/v1/models", headers=headers, timeout=30)
        if response.status_code != 200:
            raise ShadowDistillError(f"vLLM at {config.vllm_url} answered /v1/models with {response.status_code}: "
                                     f"{response.text[:200]} (is vllm_api_key vLLM's --api-key?)")
        cards = response.json()["data"]
        base = next((c for c in cards if c["id"] == config.vllm_model), None) if config.vllm_model else \
            next((c for c in cards if not c.get("parent")), None)
        if base is None:
            raise ShadowDistillError(f"vLLM at {config.vllm_url} serves no model {config.vllm_model or ''!r}")
        limit = config.max_model_len or base.get("max_model_len") or 2048
        engine = cls(config.vllm_url, load_tokenizer(config.model_dir), ModelMeta.read(config.model_dir).model_id,
                     base["id"], limit, api_key=config.vllm_api_key, observer=observer)
        engine.probe_logprob_mode()
        return engine

    # ------------------------------------------------------------------------------------ generation

    def active_adapter(self) -> AdapterInfo | None:
        return self.adapters.default()

    def named_adapters(self) -> dict[str, AdapterInfo]:
        return self.adapters.named()

    def submit(self, rows: Sequence[RowRequest], on_token: TokenCallback | None = None, *,
               adapter: str | None = None, background: bool = False) -> GenerationJob:
        """One request per row, all under one adapter; `background` work runs on its own small budget."""
        if self._closed.is_set():
            raise EngineError("gateway engine is closed")
        job = GenerationJob(list(rows), on_token, adapter=adapter, background=background)
        version = self.adapters.acquire(adapter)
        lane = self._background if background else self._client
        started = time.perf_counter()
        try:
            futures = [lane.pool.submit(self._row, job, i, row, version, lane.http) for i, row in enumerate(job.rows)]
        except RuntimeError as exc:  # the pool shut down under us (close)
            self._release(version)
            raise EngineError(f"gateway engine is closed: {exc}") from exc
        remaining = [len(futures)]

        def one_done(_: Future) -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            self._release(version)
            self._finish(job, futures, version, started)

        for f in futures:
            f.add_done_callback(one_done)
        return job

    def _finish(self, job: GenerationJob, futures: list[Future], version: str | None, started: float) -> None:
        errors = [ShadowDistillError("request cancelled") if f.cancelled() else f.exception() for f in futures]
        errors = [e for e in errors if e is not None]
        if errors:
            job.future.set_exception(errors[0] if isinstance(errors[0], ShadowDistillError)
                                     else ShadowDistillError(str(errors[0])))
            return
        results = [f.result() for f in futures]
        if self.observer is not None:
            self.observer.on_batch(len(results), sum(len(r.completion_ids) for r in results),
                                   time.perf_counter() - started)
        job.future.set_result(GenerationOutput(results, version))

    def _release(self, version: str | None) -> None:
        if self.adapters.release(version) and not self._closed.is_set():
            self._admin_pool.submit(self.adapters.collect)

    def _row(self, job: GenerationJob, index: int, row: RowRequest, version: str | None,
             http: httpx.Client) -> RowResult:
        try:
            return self._send(job, index, row, version, http)
        except _AdapterMissing:
            self.resync()  # vLLM restarted since the last health tick: reload, then try once more
            return self._send(job, index, row, version, http)

    def _send(self, job: GenerationJob, index: int, row: RowRequest, version: str | None,
              http: httpx.Client) -> RowResult:
        if job.cancelled:
            raise ShadowDistillError("request cancelled")
        on_token = (lambda tok, lp: job.on_token(index, tok, lp)) if job.on_token else None
        parser = _ChoiceParser(row, on_token)
        body = completion_body(row, version or self.served_model, stream=on_token is not None)
        try:
            if on_token is None:
                response = http.post("/v1/completions", json=body)
                _raise_for(response, version)
                parser.add(response.json()["choices"][0])
            else:
                with http.stream("POST", "/v1/completions", json=body) as response:
                    _raise_for(response, version)
                    for chunk in _sse_json(response):
                        if job.cancelled:
                            raise ShadowDistillError("request cancelled")
                        for choice in chunk.get("choices", []):
                            parser.add(choice)
        except httpx.HTTPError as exc:
            raise ShadowDistillError(f"vLLM request failed: {exc}") from exc
        return parser.result()

    # ------------------------------------------------------------------------------------ adapters

    def set_adapter(self, adapter: AdapterInfo | None) -> Future:
        return self._admin_pool.submit(self.adapters.set_default, adapter)

    def load_named_adapter(self, adapter: AdapterInfo) -> Future:
        return self._admin_pool.submit(self.adapters.load_named, adapter)

    def unload_named_adapter(self, name: str) -> Future:
        return self._admin_pool.submit(self.adapters.unload_named, name)

    def resync(self) -> list[str]:
        """Reload the adapters a restarted vLLM lost (and probe its logprob mode again); the reloaded names."""
        reloaded = self.adapters.resync(on_restart=self._restarted)
        if self._reprobe:
            self._reprobe = False
            self.probe_logprob_mode()
        return reloaded

    def _restarted(self) -> None:
        self._reprobe = True  # a restarted vLLM may run with other flags

    # ------------------------------------------------------------------------------------ logprob mode

    def probe_logprob_mode(self) -> str:
        """Ask vLLM which logprobs it returns (see `serving.vllm_logprobs`); remembered, and returned."""
        first, second = probe_requests(list(self.tokenizer.encode(PROBE_TEXT)), self.served_model)
        try:
            served_choice = self._probe_post(first)
            logprobs = served_choice["logprobs"]
            token = parse_token_id(logprobs["tokens"][0])
            served = {parse_token_id(t): float(v) for t, v in (logprobs["top_logprobs"][0] or {}).items()}
            served.setdefault(token, float(logprobs["token_logprobs"][0]))
            entry = self._probe_post(second(token))["prompt_logprobs"][-1]
            raw = {int(t): float(v["logprob"]) for t, v in entry.items()}
        except (httpx.HTTPError, ShadowDistillError, KeyError, IndexError, TypeError, ValueError) as exc:
            mode, evidence = "unknown", f"the probe failed: {type(exc).__name__}: {exc}"[:300]
        else:
            mode, evidence = classify(served, raw, PROBE_TEMPERATURE)
        self.logprobs.set(mode, evidence)
        return mode

    def _probe_post(self, body: dict) -> dict:
        response = self._admin_http.post("/v1/completions", json=body)
        _raise_for(response, None)
        return response.json()["choices"][0]

    def logprob_guard(self, sink):
        """`sink` behind a guard that refuses trajectories this upstream's logprob mode would mislabel."""
        return TrajectoryKindGuard(sink, self.logprobs)

    # ------------------------------------------------------------------------------------ health

    def is_alive(self) -> bool:
        """The health thread's last answer: no I/O here (the event loop calls this)."""
        return not self._closed.is_set() and self._alive

    def health_details(self) -> dict:
        """What /health adds for a gateway: the logprob mode and whether trajectories are logged, the adapters."""
        return {**self.logprobs.health(), "upstream_adapters": sorted(self.adapters.loaded()),
                "adapter_reloads": self.adapters.reloads}

    def stats(self) -> dict:
        """Numbers for /metrics (`shadow_vllm_gateway_*`)."""
        return {"upstream_alive": int(self.is_alive()), "adapter_reloads": self.adapters.reloads,
                "named_adapters": len(self.adapters.named()), "logprob_mode_ok": int(self.logprobs.trusted)}

    def _watch_health(self) -> None:
        while not self._closed.is_set():
            self._check_health()
            self._closed.wait(self.health_interval_s)

    def _check_health(self) -> None:
        """One tick: /health (open in vLLM), then re-sync adapters when it answers."""
        try:
            alive = self._admin_http.get("/health", timeout=HEALTH_TIMEOUT_S).status_code == 200
        except httpx.HTTPError:
            alive = False
        except RuntimeError:  # the client was closed under us (close)
            return
        if alive != self._alive:
            log.warning("vLLM at %s is %s", self.base_url, "back" if alive else "not answering /health")
        self._alive = alive
        if alive:
            try:
                self.resync()
            except (ShadowDistillError, RuntimeError) as exc:
                log.warning("adapter re-sync with vLLM failed: %s", exc)

    # ------------------------------------------------------------------------------------ lifecycle

    def close(self, timeout_s: float = 10.0) -> None:
        self._closed.set()
        for lane in (self._client, self._background):
            lane.pool.shutdown(wait=True, cancel_futures=True)
        self._admin_pool.shutdown(wait=True)
        self._monitor.join(timeout_s)
        for http in (self._client.http, self._background.http, self._admin_http):
            http.close()


def _raise_for(response: httpx.Response, adapter: str | None) -> None:
    if response.status_code < 400:
        return
    response.read()
    if response.status_code == 404 and adapter is not None:
        raise _AdapterMissing(f"vLLM does not hold adapter {adapter}: {response.text[:300]}")
    raise ShadowDistillError(f"vLLM answered {response.status_code}: {response.text[:300]}")


def _sse_json(response: httpx.Response):
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            raise ShadowDistillError(f"vLLM stream error: {chunk['error']}")
        yield chunk

