"""Teachers score completion token j with the distribution at position P - 1 + j, in batches, over HTTP too."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from message_bus.broker import free_port
from model_runtime.logprobs import completion_logprobs
from schemas.trajectory import SamplingParams, TrajectoryV1
from foundation.errors import ConfigError, InvalidTrajectory
from shadow_scoring.config import ScoringConfig
from shadow_scoring.teacher import (
    EmbeddedTeacher,
    OpenAITeacher,
    Teacher,
    parse_prompt_logprobs,
    plan_batches,
    score_in_batches,
)


def _traj(tid: str, prompt: list[int], completion: list[int]) -> TrajectoryV1:
    return TrajectoryV1(
        trajectory_id=tid, request_id=f"req-{tid}", choice_index=0, created_at=datetime(2025, 1, 1, tzinfo=UTC),
        base_model_id="tiny-student", sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16),
        prompt_token_ids=prompt, completion_token_ids=completion, behaviour_logprobs=[-1.0] * len(completion),
        logprob_kind="sampled", finish_reason="length",
    )


BATCH = [
    _traj("a", [5, 9, 14, 3], [7, 11, 2]),
    _traj("b", [8, 2], [6]),
    _traj("c", [4, 4, 4, 4, 4, 4, 4], [1, 2, 3, 4, 5]),
    _traj("d", [30, 31], [100, 200, 300, 40]),
]


@pytest.fixture(scope="module")
def teacher(tiny_models) -> EmbeddedTeacher:
    return EmbeddedTeacher(tiny_models[0], device="cpu")


def _by_hand(model, traj: TrajectoryV1, temperature: float = 1.0) -> np.ndarray:
    """One unpadded forward pass; token j of the completion is predicted at position P - 1 + j."""
    ids = traj.prompt_token_ids + traj.completion_token_ids
    with torch.no_grad():
        logits_LV = model(input_ids=torch.tensor([ids])).logits[0]
    P = len(traj.prompt_token_ids)
    return np.array([torch.log_softmax(logits_LV[P - 1 + j] / temperature, -1)[t].item()
                     for j, t in enumerate(traj.completion_token_ids)])


def test_embedded_teacher_matches_a_hand_computed_forward_pass(teacher):
    assert teacher.teacher_id == "tiny-teacher"
    scores = teacher.score(BATCH, topk=3)
    for traj, s in zip(BATCH, scores):
        expected_C = _by_hand(teacher.model, traj)
        assert s.teacher_logprobs_C.dtype == np.float32
        np.testing.assert_allclose(s.teacher_logprobs_C, expected_C, atol=1e-5)
        # The off-by-one (position P + j) would give other numbers: the check above can fail.
        shifted = np.append(expected_C[1:], expected_C[-1])
        assert len(expected_C) == 1 or np.abs(shifted - expected_C).max() > 1e-3
        assert s.topk_ids_CK.shape == (len(traj.completion_token_ids), 3)
        assert np.all(np.diff(s.topk_logprobs_CK, axis=1) <= 0)
        assert np.all(s.topk_logprobs_CK[:, 0] >= s.teacher_logprobs_C - 1e-6)


def test_temperature_changes_the_distribution_and_the_teacher_id(tiny_models, teacher):
    hot = EmbeddedTeacher(tiny_models[0], device="cpu", temperature=2.0)
    assert hot.teacher_id == "tiny-teacher@t2"
    got = hot.score(BATCH[:1])[0].teacher_logprobs_C
    np.testing.assert_allclose(got, _by_hand(teacher.model, BATCH[0], temperature=2.0), atol=1e-5)
    assert np.abs(got - teacher.score(BATCH[:1])[0].teacher_logprobs_C).max() > 1e-3
    with pytest.raises(ConfigError, match="temperature 0"):
        EmbeddedTeacher(tiny_models[0], device="cpu", temperature=0.0)


def test_plan_batches_respects_the_token_budget_and_sorts_by_length():
    lengths = [7, 3, 12, 3, 5, 40, 6]
    batches = plan_batches(lengths, batch_tokens=16)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)
    for b in batches:
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= 16 or len(b) == 1  # a row over the budget is scored alone
    assert [5] in batches
    assert plan_batches([], 16) == []
    with pytest.raises(ConfigError, match="batch_tokens 0"):
        plan_batches([1], 0)


class _Recording:
    """The real teacher, recording every batch it is asked to score."""

    def __init__(self, inner: Teacher):
        self.inner, self.teacher_id, self.vocab_size = inner, inner.teacher_id, inner.vocab_size
        self.batches: list[list[str]] = []

    def score(self, batch, topk=0):
        self.batches.append([t.trajectory_id for t in batch])
        return self.inner.score(batch, topk)


def test_score_in_batches_returns_scores_in_input_order(teacher):
    rec = _Recording(teacher)
    results = score_in_batches(rec, BATCH, batch_tokens=20)
    assert len(rec.batches) > 1
    assert sorted(i for b in rec.batches for i in b) == sorted(t.trajectory_id for t in BATCH)
    by_id = {t.trajectory_id: t for t in BATCH}
    for b in rec.batches:
        assert len(b) == 1 or len(b) * max(len(by_id[i].prompt_token_ids + by_id[i].completion_token_ids)
                                           for i in b) <= 20
    for traj, res in zip(BATCH, results):
        np.testing.assert_allclose(res.teacher_logprobs_C, _by_hand(teacher.model, traj), atol=1e-5)


def test_a_row_the_teacher_rejects_costs_only_itself(teacher):
    poison = _traj("p", [3, 4], [teacher.vocab_size + 5])
    rec = _Recording(teacher)
    results = score_in_batches(rec, [BATCH[0], poison, BATCH[1]], batch_tokens=1000)
    assert isinstance(results[1], InvalidTrajectory)
    assert "vocabulary" in str(results[1])
    np.testing.assert_allclose(results[0].teacher_logprobs_C, _by_hand(teacher.model, BATCH[0]), atol=1e-5)
    np.testing.assert_allclose(results[2].teacher_logprobs_C, _by_hand(teacher.model, BATCH[1]), atol=1e-5)
    assert rec.batches[0] == ["p", "b", "a"]
    assert len(rec.batches) == 4  # the batch, then row by row


# ---- a vLLM-compatible server, served from the embedded teacher -------------------------------------------------
def _vllm_app(teacher: EmbeddedTeacher, state: dict) -> FastAPI:
    """`POST /v1/completions` with vLLM's `prompt_logprobs` wire format (see shadow_scoring/teacher.py)."""
    app = FastAPI()

    def prompt_logprobs(ids: list[int], k: int) -> list[dict | None]:
        full = completion_logprobs(teacher.model, [ids[:1]], [ids[1:]], teacher.pad_id, topk=teacher.vocab_size)[0]
        out: list[dict | None] = [None]
        for pos, token in enumerate(ids[1:]):
            ranked_ids, ranked_lps = full.topk_ids_CK[pos].tolist(), full.topk_logprobs_CK[pos].tolist()
            entry = {str(t): {"logprob": lp, "rank": r + 1, "decoded_token": f"<{t}>"}
                     for r, (t, lp) in enumerate(zip(ranked_ids[:k], ranked_lps[:k]))}
            rank = ranked_ids.index(token)
            entry[str(token)] = {"logprob": ranked_lps[rank], "rank": rank + 1, "decoded_token": f"<{token}>"}
            out.append(entry)
        return out

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        state["requests"].append(body)
        if state.get("fail_with"):
            return JSONResponse({"error": "overloaded"}, status_code=state["fail_with"])
        if body["model"] != "tiny-teacher":
            return JSONResponse({"error": f"The model `{body['model']}` does not exist."}, status_code=404)
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        if any(t >= teacher.vocab_size for p in prompts for t in p):
            return JSONResponse({"error": "Token id out of vocabulary"}, status_code=400)
        choices = [{"index": i, "text": "", "finish_reason": "length", "logprobs": None,
                    "prompt_logprobs": prompt_logprobs(p, body["prompt_logprobs"])} for i, p in enumerate(prompts)]
        return {"id": "cmpl-test", "object": "text_completion", "model": body["model"], "choices": choices}

    return app


@pytest.fixture(scope="module")
def vllm_server(teacher):
    state: dict = {"requests": []}
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_vllm_app(teacher, state), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        threading.Event().wait(0.02)
    yield f"http://127.0.0.1:{port}", state
    server.should_exit = True
    thread.join(10)


def test_openai_teacher_gives_the_embedded_teachers_logprobs(teacher, vllm_server):
    url, state = vllm_server
    remote = OpenAITeacher(url + "/v1/", "tiny-teacher", vocab_size=teacher.vocab_size)
    assert remote.teacher_id == teacher.teacher_id
    state["requests"].clear()
    got = score_in_batches(remote, BATCH, batch_tokens=1000, topk=4)
    want = teacher.score(BATCH, topk=4)
    body = state["requests"][0]
    assert len(state["requests"]) == 1
    assert body["max_tokens"] == 1
    assert body["prompt_logprobs"] == 4
    assert sorted(map(len, body["prompt"])) == sorted(len(t.prompt_token_ids + t.completion_token_ids) for t in BATCH)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.teacher_logprobs_C, w.teacher_logprobs_C, atol=1e-5)
        np.testing.assert_array_equal(g.topk_ids_CK, w.topk_ids_CK)
        np.testing.assert_allclose(g.topk_logprobs_CK, w.topk_logprobs_CK, atol=1e-5)
    remote.close()


def test_openai_teacher_maps_server_refusals(teacher, vllm_server):
    url, state = vllm_server
    # The server, not the client, catches this token: the client was told a larger vocabulary.
    remote = OpenAITeacher(url, "tiny-teacher", vocab_size=teacher.vocab_size + 100)
    results = score_in_batches(remote, [BATCH[0], _traj("p", [1], [teacher.vocab_size + 1])], batch_tokens=1000)
    assert isinstance(results[1], InvalidTrajectory)
    assert "400" in str(results[1])
    np.testing.assert_allclose(results[0].teacher_logprobs_C, _by_hand(teacher.model, BATCH[0]), atol=1e-5)
    with pytest.raises(ConfigError, match="404"):
        OpenAITeacher(url, "no-such-model", vocab_size=10).probe()
    state["fail_with"] = 503
    try:
        with pytest.raises(ConnectionError, match="503"):
            remote.score(BATCH[:1])
    finally:
        state["fail_with"] = None
    with pytest.raises(ConnectionError, match="unreachable"):
        OpenAITeacher(f"http://127.0.0.1:{free_port()}", "tiny-teacher", vocab_size=1000).score(BATCH[:1])


def test_parse_prompt_logprobs_checks_alignment():
    entries = [None, {"7": {"logprob": -0.5, "rank": 1}}, {"9": {"logprob": -2.0, "rank": 3},
                                                           "1": {"logprob": -0.1, "rank": 1},
                                                           "2": {"logprob": -1.0, "rank": 2}}]
    s = parse_prompt_logprobs(entries, [3], [7, 9], topk=0)
    np.testing.assert_allclose(s.teacher_logprobs_C, [-0.5, -2.0])
    with pytest.raises(Exception, match="entries for 2 \\+ 2"):
        parse_prompt_logprobs(entries, [3, 4], [7, 9])
    with pytest.raises(Exception, match="no logprob for the prompt's token 8"):
        parse_prompt_logprobs(entries, [3], [7, 8])
    with pytest.raises(Exception, match="top-2 asked"):
        parse_prompt_logprobs(entries, [3], [7, 9], topk=2)


def test_config_names_the_bad_value():
    ok = dict(bootstrap_servers="127.0.0.1:9092", store_url="sqlite:///x.db", teacher="/models/teacher")
    cfg = ScoringConfig(**ok, session_timeout_ms=6000, group_id="g1")
    consumer = cfg.consumer_settings()
    assert consumer["enable_auto_commit"] is False
    assert consumer["group_id"] == "g1"
    assert (consumer["session_timeout_ms"], consumer["heartbeat_interval_ms"]) == (6000, 2000)
    assert cfg.producer_settings()["acks"] == "all"
    for bad, match in [({"batch_tokens": 0}, "batch_tokens"), ({"bootstrap_servers": "localhost"}, "host:port"),
                       ({"dlq_topic": "shadow.trajectories.v1"}, "dlq_topic"),
                       ({"teacher": "http://vllm:8000"}, "teacher_model and teacher_vocab_size"),
                       ({"retry_initial_s": 5.0, "retry_max_s": 1.0}, "retry_max_s")]:
        with pytest.raises(ValueError, match=match):
            ScoringConfig(**{**ok, **bad})


def _record(headers=None):
    from kafka.consumer.fetcher import ConsumerRecord

    return ConsumerRecord("t", 1, 0, 42, 0, 0, b"k", b"v", headers or [], None, 1, 1, 0)


def test_dead_letter_headers_keep_the_first_line_of_the_error_and_the_source():
    from shadow_scoring.consumer import dead_letter_headers

    class DBError(Exception):
        orig = "value violates check constraint\nDETAIL: Failing row contains (secret user text)"

    headers = dict(dead_letter_headers(_record([("h", b"1")]), DBError("statement [SQL ...]")))
    assert headers["x-error"] == b"value violates check constraint"
    assert headers["h"] == b"1"
    assert headers["x-source-offset"] == b"42"
    assert headers["x-error-type"] == b"DBError"


def test_dead_letter_headers_name_an_error_without_a_message():
    from shadow_scoring.consumer import dead_letter_headers

    class Silent(Exception):
        orig = Exception()  # a driver error with no message (truthy, but str() is empty)

    assert dict(dead_letter_headers(_record(), Silent("outer")))["x-error"] == b"Silent"
    assert dict(dead_letter_headers(_record(), ValueError()))["x-error"] == b"ValueError"


# ---- top-k by default -----------------------------------------------------------------------------------------
OK = dict(bootstrap_servers="127.0.0.1:9092", store_url="sqlite:///x.db", teacher="/models/teacher")


def test_topk_is_on_by_default_at_20():
    assert ScoringConfig(**OK).topk == 20


def test_topk_zero_turns_it_off():
    assert ScoringConfig(**OK, topk=0).topk == 0


def test_a_score_costs_4_bytes_plus_8_per_topk_entry_per_token():
    from shadow_scoring.scoring import bytes_per_token

    assert (bytes_per_token(0), bytes_per_token(20)) == (4, 164)


def test_parse_prompt_logprobs_reads_top20_with_the_prompt_token_outside_it():
    """vLLM sends k + 1 entries when the prompt's token is not among the top k (here rank 25)."""
    top = {str(100 + r): {"logprob": -0.1 * r, "rank": r} for r in range(1, 21)}
    entries = [None, {**top, "7": {"logprob": -9.0, "rank": 25}}]
    s = parse_prompt_logprobs(entries, [3], [7], topk=20)
    assert s.topk_ids_CK.tolist() == [[100 + r for r in range(1, 21)]]
    np.testing.assert_allclose(s.teacher_logprobs_C, [-9.0])


def test_parse_prompt_logprobs_reads_top20_with_the_prompt_token_inside_it():
    top = {str(100 + r): {"logprob": -0.1 * r, "rank": r} for r in range(1, 21)}
    s = parse_prompt_logprobs([None, top], [3], [105], topk=20)
    np.testing.assert_allclose(s.teacher_logprobs_C, [-0.5])
    np.testing.assert_allclose(s.topk_logprobs_CK[0], [-0.1 * r for r in range(1, 21)], rtol=1e-6)


def test_openai_teacher_asks_for_and_returns_top20(teacher, vllm_server):
    url, state = vllm_server
    remote = OpenAITeacher(url, "tiny-teacher", vocab_size=teacher.vocab_size)
    state["requests"].clear()
    got = remote.score(BATCH[:2], topk=20)
    want = teacher.score(BATCH[:2], topk=20)
    assert state["requests"][0]["prompt_logprobs"] == 20
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.topk_ids_CK, w.topk_ids_CK)
    remote.close()


# ---- tokenizers: teacher and student must share one -----------------------------------------------------------
def folder_fingerprint(folder) -> str:
    from model_runtime.tokenizers import folder_fingerprint

    return folder_fingerprint(folder)


def test_an_http_teacher_needs_its_tokenizer_folder():
    with pytest.raises(ValueError, match="teacher_tokenizer"):
        ScoringConfig(**{**OK, "teacher": "http://vllm:8000"}, teacher_model="m", teacher_vocab_size=10)


def test_an_embedded_teacher_carries_its_tokenizer_fingerprint_and_temperature(tiny_models, teacher):
    assert (teacher.tokenizer_fingerprint, teacher.temperature) == (folder_fingerprint(tiny_models[0]), 1.0)


def test_an_http_teacher_fingerprints_its_configured_tokenizer_folder(tiny_models, vllm_server):
    remote = OpenAITeacher(vllm_server[0], "tiny-teacher", vocab_size=10, tokenizer_dir=tiny_models[0])
    assert (remote.tokenizer_fingerprint, remote.temperature) == (folder_fingerprint(tiny_models[0]), 1.0)
    remote.close()


@pytest.fixture(scope="module")
def permuted_teacher_dir(tiny_models, tmp_path_factory):
    """The tiny teacher with its ordinary token ids reversed in tokenizer.json: same vocabulary size (so the
    old `max id < vocab_size` check passes), other tokens per id."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("permuted") / "teacher"
    shutil.copytree(tiny_models[0], folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    added = {t["content"] for t in data["added_tokens"]}
    vocab = data["model"]["vocab"]
    plain = sorted(i for t, i in vocab.items() if t not in added)
    flip = dict(zip(plain, reversed(plain), strict=True))
    data["model"]["vocab"] = {t: flip.get(i, i) for t, i in vocab.items()}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def _scorer_config(tmp_path, teacher_dir, student_dir) -> ScoringConfig:
    return ScoringConfig(bootstrap_servers="127.0.0.1:1", store_url=f"sqlite:///{tmp_path / 's.db'}",
                         teacher=str(teacher_dir), device="cpu", student_tokenizer=str(student_dir))


def test_a_teacher_with_a_permuted_vocabulary_is_refused_at_startup(tiny_models, permuted_teacher_dir, tmp_path):
    from shadow_scoring.consumer import ScoringService

    cfg = _scorer_config(tmp_path, permuted_teacher_dir, tiny_models[1])
    with pytest.raises(ConfigError) as refused:
        ScoringService.from_config(cfg)
    message = str(refused.value)
    assert folder_fingerprint(permuted_teacher_dir) != folder_fingerprint(tiny_models[1])
    assert folder_fingerprint(permuted_teacher_dir) in message
    assert folder_fingerprint(tiny_models[1]) in message
    assert str(permuted_teacher_dir) in message
    assert str(tiny_models[1]) in message


def test_a_teacher_with_the_students_tokenizer_is_accepted_at_startup(tiny_models, tmp_path):
    from shadow_scoring.consumer import ScoringService

    service = ScoringService.from_config(_scorer_config(tmp_path, tiny_models[0], tiny_models[1]))
    assert service.teacher.tokenizer_fingerprint == folder_fingerprint(tiny_models[1])
