"""Teachers: per-token logprobs of logged completions, from a model in this process or from a vLLM server.

Both read the trajectory's own token ids (`prompt_token_ids + completion_token_ids`) and never re-tokenize
text, so the teacher sees exactly the states the student visited. Completion token j is scored by the
distribution at position P - 1 + j (`model_runtime.logprobs` is the one place that aligns positions).

    teacher = EmbeddedTeacher("~/.cache/shadow-distill/models/teacher")          # in-process, one pass/batch
    teacher = OpenAITeacher("http://vllm:8000", "smollm2-135m-instruct", vocab_size=49152,
                            tokenizer_dir="/models/teacher")
    results = score_in_batches(teacher, trajectories, batch_tokens=8192, topk=20)

Every teacher carries `tokenizer_fingerprint` (`model_runtime.tokenizers`) and the `temperature` it scores
under; the scorer stamps both on every score row and, at start-up, refuses a teacher whose fingerprint differs
from the student's (`check_tokenizer_match`): the same vocabulary size is not the same vocabulary.

Wire format assumed for `OpenAITeacher` (vLLM's OpenAI-compatible server, `vllm/entrypoints/openai/protocol.py`):
request `POST {base}/v1/completions` with `{"model": M, "prompt": [[ids...], ...], "max_tokens": 1,
"prompt_logprobs": k}`; response `choices[i].prompt_logprobs` (choice `index` i = prompt i) is a list with one
entry per prompt position: `null` for position 0, else a dict `"<token_id>": {"logprob": float, "rank": int,
"decoded_token": str}` holding the top-k tokens plus the prompt's own token at that position (k + 1 entries when
the prompt token is outside the top k). vLLM returns these in its default `raw_logprobs` mode (temperature 1,
no processing). `k` may not exceed the server's `--max-logprobs` (20 by default).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from feature_store.store import TeacherScores
from schemas.trajectory import Trajectory
from foundation.errors import AlignmentError, ConfigError, InvalidTrajectory, TeacherUnavailable

if TYPE_CHECKING:
    from shadow_scoring.config import ScoringConfig


@runtime_checkable
class Teacher(Protocol):
    """Scores a batch of trajectories in one go; `score` may raise `InvalidTrajectory` for a batch it rejects.

    Optional: `refusal(traj)` names a row the teacher cannot score before any batch is built (a cross-tokenizer
    teacher's unalignable rows), `seq_len(traj)` what it will read (for the token budget), and
    `student_tokenizer_fingerprint` the student tokenizer its scores are projected onto (cross-tokenizer)."""

    teacher_id: str
    vocab_size: int
    tokenizer_fingerprint: str | None  # None: unknown (stored as such; the trainer will not trust it)
    temperature: float

    def score(self, batch: list[Trajectory], topk: int = 0) -> list[TeacherScores]: ...


# ---- pure batching logic ------------------------------------------------------------------------------------
def seq_len(traj: Trajectory) -> int:
    return len(traj.prompt_token_ids) + len(traj.completion_token_ids)


def plan_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices into batches whose padded size (rows x longest row) fits `batch_tokens`.

    Indices are sorted by length first, so rows of similar length share a batch and little is padding. A row
    longer than the budget gets a batch of its own (it must still be scored).
    """
    if batch_tokens < 1:
        raise ConfigError(f"batch_tokens {batch_tokens} must be >= 1")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Sorted ascending, so row i is the longest of `current + [i]`.
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def check_vocab(traj: Trajectory, vocab_size: int) -> None:
    """A token id the teacher has no embedding for makes the message unscorable: a poison, not a crash."""
    top = traj.max_token_id()
    if top >= vocab_size:
        raise InvalidTrajectory(f"{traj.trajectory_id}: token id {top} >= teacher vocabulary size {vocab_size}")


class SameVocabularyTeacher:
    """A teacher scoring the student's own ids: `score` checks them against its vocabulary, then `score_ids`."""

    vocab_size: int

    def score(self, batch: list[Trajectory], topk: int = 0) -> list[TeacherScores]:
        for traj in batch:
            check_vocab(traj, self.vocab_size)
        return self.score_ids([t.prompt_token_ids for t in batch], [t.completion_token_ids for t in batch], topk)

    def score_ids(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  topk: int = 0) -> list[TeacherScores]:
        raise NotImplementedError


def score_in_batches(teacher: Teacher, trajs: Sequence[Trajectory], batch_tokens: int,
                     topk: int = 0) -> list[TeacherScores | InvalidTrajectory]:
    """Score every trajectory, batched by token budget; results come back in the order of `trajs`.

    When the teacher rejects a batch (`InvalidTrajectory`), its rows are retried one by one, so one bad row
    costs only itself: its slot holds the error instead of scores. Other errors (teacher down) propagate.
    """
    results: list[TeacherScores | InvalidTrajectory | None] = [None] * len(trajs)
    refusal, length = getattr(teacher, "refusal", None), getattr(teacher, "seq_len", seq_len)
    todo = list(range(len(trajs)))
    if refusal is not None:
        for i in todo:
            results[i] = refusal(trajs[i])
        todo = [i for i in todo if results[i] is None]
    for batch in plan_batches([length(trajs[i]) for i in todo], batch_tokens):
        idx = [todo[b] for b in batch]
        try:
            scores = teacher.score([trajs[i] for i in idx], topk)
        except InvalidTrajectory as exc:
            if len(idx) == 1:
                results[idx[0]] = exc
                continue
            for i in idx:
                try:
                    results[i] = teacher.score([trajs[i]], topk)[0]
                except InvalidTrajectory as one_exc:
                    results[i] = one_exc
            continue
        if len(scores) != len(idx):
            raise AlignmentError(f"teacher {teacher.teacher_id!r} returned {len(scores)} scores for {len(idx)} rows")
        for i, s in zip(idx, scores, strict=True):
            results[i] = s
    return results  # type: ignore[return-value]  # every slot was filled above


# ---- embedded teacher -----------------------------------------------------------------------------------------
class EmbeddedTeacher(SameVocabularyTeacher):
    """A causal LM loaded in this process; one forward pass per `score` call (one left-padded batch)."""

    def __init__(self, model_dir: str | Path, device: str = "auto", temperature: float = 1.0,
                 threads: int | None = None):
        from model_runtime.models import ModelMeta, load_model, pick_device
        from model_runtime.tokenizers import folder_fingerprint

        if not temperature > 0:
            raise ConfigError(f"teacher temperature {temperature} must be > 0")
        if threads is not None:
            import torch

            torch.set_num_threads(threads)  # process-wide: a scorer process runs one teacher
        self.model_dir = Path(model_dir).expanduser()
        meta = ModelMeta.read(self.model_dir)
        self.tokenizer_fingerprint = folder_fingerprint(self.model_dir)
        self.model = load_model(self.model_dir, pick_device(device))
        self.temperature = temperature
        self.teacher_id = meta.model_id if temperature == 1.0 else f"{meta.model_id}@t{temperature:g}"
        self.vocab_size = int(self.model.config.vocab_size)
        # Padded positions are masked out, so any valid id will do.
        self.pad_id = int(self.model.generation_config.pad_token_id or self.model.config.pad_token_id or 0)

    def score_ids(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  topk: int = 0) -> list[TeacherScores]:
        """Scores of completions given as this teacher's own token ids (what a cross-tokenizer view holds)."""
        from model_runtime.logprobs import completion_logprobs

        if not prompts:
            return []
        if topk > self.vocab_size:
            raise ConfigError(f"topk {topk} exceeds the teacher vocabulary size {self.vocab_size}")
        scored = completion_logprobs(self.model, prompts, completions, self.pad_id, temperature=self.temperature,
                                     topk=topk)
        return [
            TeacherScores(
                teacher_logprobs_C=s.logprobs_C.numpy().astype(np.float32),
                topk_ids_CK=None if s.topk_ids_CK is None else s.topk_ids_CK.numpy(),
                topk_logprobs_CK=None if s.topk_logprobs_CK is None else s.topk_logprobs_CK.numpy().astype(np.float32),
            )
            for s in scored
        ]


# ---- OpenAI-compatible (vLLM) teacher ---------------------------------------------------------------------------
def parse_prompt_logprobs(entries: list[dict[str, dict[str, Any]] | None], prompt_ids: Sequence[int],
                          completion_ids: Sequence[int], topk: int = 0) -> TeacherScores:
    """Read the completion positions of one vLLM `prompt_logprobs` list (see the module docstring)."""
    P, C = len(prompt_ids), len(completion_ids)
    if len(entries) != P + C:
        raise AlignmentError(f"server sent {len(entries)} prompt_logprobs entries for {P} + {C} tokens")
    logprobs_C = np.empty(C, dtype=np.float32)
    ids_CK = np.empty((C, topk), dtype=np.int64)
    topk_logprobs_CK = np.empty((C, topk), dtype=np.float32)
    for j, token in enumerate(completion_ids):
        entry = entries[P + j]
        own = entry.get(str(token)) if entry else None
        if own is None:
            raise AlignmentError(f"position {P + j}: the server sent no logprob for the prompt's token {token}")
        logprobs_C[j] = own["logprob"]
        if topk:
            ranked = sorted(entry.items(), key=lambda kv: (kv[1].get("rank") or 1 << 30, -kv[1]["logprob"]))
            if len(ranked) < topk:
                raise AlignmentError(f"position {P + j}: the server sent {len(ranked)} logprobs, top-{topk} asked")
            ids_CK[j] = [int(tok) for tok, _ in ranked[:topk]]
            topk_logprobs_CK[j] = [v["logprob"] for _, v in ranked[:topk]]
    if not topk:
        return TeacherScores(logprobs_C)
    return TeacherScores(logprobs_C, ids_CK, topk_logprobs_CK)


class OpenAITeacher(SameVocabularyTeacher):
    """A teacher behind an OpenAI-compatible server that implements vLLM's `prompt_logprobs` (e.g. `vllm serve`).

    `model` is the served model name; it is also the `teacher_id` scores are stored under unless
    `teacher_id` is given, so serve the teacher under its `ModelMeta.model_id`. The server reports neither its
    vocabulary size nor its tokenizer, hence `vocab_size` and `tokenizer_dir` (a local copy of the served
    model's tokenizer, fingerprinted here). vLLM's prompt_logprobs are the raw distribution: temperature 1.
    Transport failures, 408, 429 and 5xx raise `TeacherUnavailable` (a `ConnectionError`) (retry later);
    400/413/422 raise `InvalidTrajectory` (this batch cannot be scored); other refusals `ConfigError`.
    """

    temperature = 1.0

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, vocab_size: int,
                 timeout_s: float = 120.0, teacher_id: str | None = None, tokenizer_dir: str | Path | None = None):
        import httpx

        from model_runtime.tokenizers import folder_fingerprint

        if vocab_size < 1:
            raise ConfigError(f"vocab_size {vocab_size} must be >= 1")
        self.tokenizer_dir = None if tokenizer_dir is None else Path(tokenizer_dir).expanduser()
        self.tokenizer_fingerprint = None if self.tokenizer_dir is None else folder_fingerprint(self.tokenizer_dir)
        root = base_url.rstrip("/")
        self.base_url = root[: -len("/v1")] if root.endswith("/v1") else root
        self.model = model
        self.teacher_id = teacher_id or model
        self.vocab_size = vocab_size
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def request_body(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     topk: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "prompt": [list(p) + list(c) for p, c in zip(prompts, completions, strict=True)],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": topk,
        }

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        try:
            resp = self._client.post("/v1/completions", json=body)
        except httpx.TransportError as exc:
            raise TeacherUnavailable(f"teacher server {self.base_url} unreachable: {exc!r}") from exc
        status, detail = resp.status_code, resp.text[:500]
        if status in (408, 429) or status >= 500:
            raise TeacherUnavailable(f"teacher server {self.base_url} answered {status}: {detail}")
        if status in (400, 413, 422):
            raise InvalidTrajectory(f"teacher server rejected the request ({status}): {detail}")
        if status != 200:
            raise ConfigError(f"teacher server {self.base_url} refused model {self.model!r} ({status}): {detail}")
        return resp.json()

    def score_ids(self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                  topk: int = 0) -> list[TeacherScores]:
        """Scores of completions given as the served model's own token ids (`prompt_logprobs` on prompt + completion)."""
        if not prompts:
            return []
        body = self.request_body(prompts, completions, topk)
        choices = sorted(self._post(body).get("choices") or [], key=lambda c: c["index"])
        if [c["index"] for c in choices] != list(range(len(prompts))):
            raise AlignmentError(f"server answered choices {[c['index'] for c in choices]} for {len(prompts)} prompts")
        out = []
        for prompt, completion, choice in zip(prompts, completions, choices, strict=True):
            entries = choice.get("prompt_logprobs")
            if entries is None:
                raise AlignmentError(f"{self.base_url} returned no prompt_logprobs: is it a vLLM-compatible server?")
            out.append(parse_prompt_logprobs(entries, prompt, completion, topk))
        return out

    def probe(self, topk: int = 0) -> None:
        """Fail at start-up, not per message, when the model name, the key or `topk` is refused."""
        try:
            self._post({"model": self.model, "prompt": [[0, 0]], "max_tokens": 1, "prompt_logprobs": topk})
        except InvalidTrajectory as exc:
            raise ConfigError(f"teacher server refuses prompt_logprobs={topk} (see --max-logprobs): {exc}") from exc

    def close(self) -> None:
        self._client.close()


def teacher_folder(teacher: Teacher) -> str:
    """Where a teacher's tokenizer was read from, for messages."""
    folder = getattr(teacher, "model_dir", None) or getattr(teacher, "tokenizer_dir", None)
    return str(folder) if folder is not None else "(unknown folder)"


def check_tokenizer_match(config: ScoringConfig, teacher: Teacher) -> None:
    """Refuse a teacher whose scores are not per token of the student's tokenizer: logprobs of other tokens.

    Nothing is checked when `config.student_tokenizer` is unset (the scores still record the teacher's
    fingerprint, so a trainer can refuse them later)."""
    if config.student_tokenizer is None:
        return
    from model_runtime.tokenizers import require_shared_tokenizer

    # A cross-tokenizer teacher's scores are per token of the student tokenizer it projects onto.
    scores_for = getattr(teacher, "student_tokenizer_fingerprint", None) or teacher.tokenizer_fingerprint
    require_shared_tokenizer(config.student_tokenizer, scores_for,
                             f"{teacher.teacher_id!r} (tokenizer {teacher_folder(teacher)})")


def build_teacher(config: ScoringConfig) -> Teacher:
    """The teacher a `ScoringConfig` names: a server URL gives `OpenAITeacher` (probed), a folder `EmbeddedTeacher`;
    either is refused unless its tokenizer is the student's (`check_tokenizer_match`), or, with
    `cross_tokenizer`, wrapped in a `CrossTokenizerTeacher` when it is not."""
    if config.teacher_is_http:
        teacher: Teacher = OpenAITeacher(
            config.teacher, config.teacher_model or "", config.teacher_api_key, vocab_size=config.teacher_vocab_size or 0,
            timeout_s=config.teacher_timeout_s, tokenizer_dir=config.teacher_tokenizer)
        teacher.probe(config.stored_topk)
    else:
        teacher = EmbeddedTeacher(config.teacher, device=config.device, temperature=config.temperature,
                                  threads=config.torch_threads)
    if not config.cross_tokenizer:
        check_tokenizer_match(config, teacher)
        return teacher
    return cross_tokenizer_teacher(config, teacher)


def cross_tokenizer_teacher(config: ScoringConfig, teacher: Teacher) -> Teacher:
    """`teacher` behind the cross-tokenizer view when its tokenizer is not the student's (else as it is)."""
    import logging

    from model_runtime.models import load_tokenizer
    from model_runtime.tokenizers import folder_fingerprint
    from shadow_scoring.cross_tokenizer import CrossTokenizerTeacher

    log = logging.getLogger(__name__)
    folder = teacher_folder(teacher)
    if folder_fingerprint(config.student_tokenizer) == teacher.tokenizer_fingerprint:
        log.info("cross_tokenizer: teacher %s shares the student's tokenizer; scoring its ids as they are",
                 teacher.teacher_id)
        return teacher
    if config.topk:
        log.info("cross_tokenizer: top-k is not stored (topk=%d asked): the teacher's vocabulary is not the "
                 "student's, so only rule 1 and rollouts can train on its scores", config.topk)
    log.info("cross_tokenizer: teacher %s (tokenizer %s) re-renders each trajectory in its own chat template; "
             "scores are stored per student token over aligned spans", teacher.teacher_id, folder)
    return CrossTokenizerTeacher(teacher, load_tokenizer(config.student_tokenizer), load_tokenizer(folder), None)
