"""Gateway engine: the same serving API in front of a vLLM server, with exact token ids in every trajectory.

vLLM cannot share this virtualenv (it pins other torch/transformers versions), so it runs as its own server:

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True \\
    vllm serve <student dir> --enable-lora --max-lora-rank 16 --logprobs-mode processed_logprobs

`--logprobs-mode processed_logprobs` makes the returned logprobs those of the distribution actually sampled
from (after temperature, top-k, top-p): the `sampled` behaviour logprobs the trainer's importance ratio needs.
For greedy requests vLLM returns the model's own logprobs, which is this project's `raw` kind.

The gateway tokenizes itself (chat template, in the API layer), so it sends token-id prompts to vLLM's
`/v1/completions`, one request per choice (each with its own seed), asking for `logprobs`,
`return_tokens_as_token_ids` (tokens come back as `token_id:N`, the ids it logs) and `return_token_ids`
(vLLM >= 0.10; checked against the former when present). vLLM's own sampling extras (`min_p`, `min_tokens`,
`ignore_eos`, `stop_token_ids`, `include_stop_str_in_output`, `skip_special_tokens`, `prompt_logprobs`) go
through under vLLM's names, so both engines honour the same fields. Adapters are loaded with vLLM's
`POST /v1/load_lora_adapter` under their version as `lora_name` (the path must be readable by the vLLM
server); the previous adapter is unloaded only once the requests using it have finished, so a swap fails
no request. The embedded server exposes the same endpoints, which is how the contract test checks this
client against it.

    python -m serving.api_server --engine vllm --vllm-url http://127.0.0.1:8001 --model-dir <student dir>
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

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
from foundation.errors import AdapterError, ShadowDistillError

log = logging.getLogger(__name__)
TOKEN_ID_PREFIX = "token_id:"
HEALTH_CACHE_S = 2.0


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


class VLLMEngine:
    kind = "vllm"

    def __init__(self, base_url: str, tokenizer: PreTrainedTokenizerBase, base_model_id: str, served_model: str,
                 max_model_len: int, *, api_key: str | None = None, admin_token: str | None = None,
                 max_concurrency: int = 64, timeout_s: float = 600.0, observer: EngineObserver | None = None):
        self.base_url = base_url.rstrip("/")
        self.tokenizer = tokenizer
        self.base_model_id = base_model_id
        self.served_model = served_model
        self.max_model_len = max_model_len
        self.eos_ids = eos_token_ids(tokenizer)  # the serving layer's text rule (vLLM decides when to stop)
        self.observer = observer
        self._admin_headers = {"Authorization": f"Bearer {admin_token or api_key}"} if (admin_token or api_key) else {}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s,
                                  limits=httpx.Limits(max_connections=max_concurrency))
        self._pool = ThreadPoolExecutor(max_concurrency, thread_name_prefix="vllm-gateway")
        self._admin_pool = ThreadPoolExecutor(1, thread_name_prefix="vllm-adapters")
        self._lock = threading.Lock()
        self._active: AdapterInfo | None = None
        self._in_flight: dict[str | None, int] = {}
        self._retired: set[str] = set()  # versions to unload once their requests finish
        self._closed = False
        self._health = (0.0, False)

    @classmethod
    def from_config(cls, config: ServingConfig, observer: EngineObserver | None = None) -> VLLMEngine:
        import os

        assert config.vllm_url is not None
        headers = {"Authorization": f"Bearer {config.vllm_api_key}"} if config.vllm_api_key else {}
        cards = httpx.get(f"{config.vllm_url.rstrip('/')}/v1/models", headers=headers, timeout=30).json()["data"]
        base = next((c for c in cards if c["id"] == config.vllm_model), None) if config.vllm_model else \
            next((c for c in cards if not c.get("parent")), None)
        if base is None:
            raise ShadowDistillError(f"vLLM at {config.vllm_url} serves no model {config.vllm_model or ''!r}")
        limit = config.max_model_len or base.get("max_model_len") or 2048
        return cls(config.vllm_url, load_tokenizer(config.model_dir), ModelMeta.read(config.model_dir).model_id,
                   base["id"], limit, api_key=config.vllm_api_key, admin_token=os.environ.get(config.admin_token_env),
                   observer=observer)

    # ------------------------------------------------------------------------------------ generation

    def active_adapter(self) -> AdapterInfo | None:
        return self._active

    def submit(self, rows: Sequence[RowRequest], on_token: TokenCallback | None = None) -> GenerationJob:
        if self._closed:
            raise ShadowDistillError("gateway engine is closed")
        job = GenerationJob(list(rows), on_token)
        version = self._acquire()
        started = time.perf_counter()
        futures = [self._pool.submit(self._row, job, i, row, version) for i, row in enumerate(job.rows)]
        remaining = [len(futures)]

        def one_done(_: Future) -> None:
            with self._lock:
                remaining[0] -= 1
                if remaining[0]:
                    return
            self._release(version)
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

        for f in futures:
            f.add_done_callback(one_done)
        return job

    def _row(self, job: GenerationJob, index: int, row: RowRequest, version: str | None) -> RowResult:
        if job.cancelled:
            raise ShadowDistillError("request cancelled")
        on_token = (lambda tok, lp: job.on_token(index, tok, lp)) if job.on_token else None
        parser = _ChoiceParser(row, on_token)
        body = completion_body(row, version or self.served_model, stream=on_token is not None)
        try:
            if on_token is None:
                response = self._http.post("/v1/completions", json=body)
                _raise_for(response)
                parser.add(response.json()["choices"][0])
            else:
                with self._http.stream("POST", "/v1/completions", json=body) as response:
                    _raise_for(response)
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
        return self._admin_pool.submit(self._set_adapter, adapter)

    def _set_adapter(self, adapter: AdapterInfo | None) -> None:
        with self._lock:  # a version retired but still draining is still loaded: serve it again as is
            revived = adapter is not None and adapter.version in self._retired
            self._retired.discard(adapter.version if adapter else "")
        if adapter is not None and not revived:
            response = self._http.post("/v1/load_lora_adapter", headers=self._admin_headers,
                                       json={"lora_name": adapter.version, "lora_path": str(adapter.path)})
            if response.status_code != 200:
                raise AdapterError(f"vLLM refused adapter {adapter.version}: {response.text[:300]}")
        with self._lock:
            old, self._active = self._active, adapter
            if old is not None and (adapter is None or old.version != adapter.version):
                self._retired.add(old.version)
            drained = [v for v in self._retired if not self._in_flight.get(v)]
            self._retired.difference_update(drained)
        for version in drained:
            self._unload(version)

    def _acquire(self) -> str | None:
        with self._lock:
            version = self._active.version if self._active else None
            self._in_flight[version] = self._in_flight.get(version, 0) + 1
            return version

    def _release(self, version: str | None) -> None:
        with self._lock:
            self._in_flight[version] -= 1
            drained = version in self._retired and not self._in_flight[version]
            if drained:
                self._retired.discard(version)
        if drained:
            self._admin_pool.submit(self._unload, version)

    def _unload(self, version: str) -> None:
        response = self._http.post("/v1/unload_lora_adapter", headers=self._admin_headers,
                                   json={"lora_name": version})
        if response.status_code != 200:
            log.warning("vLLM did not unload adapter %s: %s", version, response.text[:300])

    # ------------------------------------------------------------------------------------ lifecycle

    def is_alive(self) -> bool:
        if self._closed:
            return False
        checked_at, ok = self._health
        if time.monotonic() - checked_at > HEALTH_CACHE_S:
            try:
                ok = self._http.get("/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                ok = False
            self._health = (time.monotonic(), ok)
        return ok

    def close(self, timeout_s: float = 10.0) -> None:
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._admin_pool.shutdown(wait=True)
        self._http.close()


def _raise_for(response: httpx.Response) -> None:
    if response.status_code >= 400:
        response.read()
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

