"""The embedded engine on the tiny student: batching, seeds, stops, alternatives, adapter swaps, failures."""

import threading
import time
from concurrent.futures import CancelledError

import pytest
import torch

from model_runtime.models import ModelMeta, load_model, load_tokenizer
from model_runtime.sampling import DecodeParams
from serving.detokenize import decode, final_text
from serving.engine import EmbeddedEngine
from serving.engine_base import AdapterInfo, RowRequest
from model_runtime.threads import torch_threads
from tests.support.serving import make_adapter
from foundation.errors import AdapterError, ShadowDistillError

PROMPT = (1, 300, 262, 201, 293, 275, 81, 2, 201, 1)


class Batches:
    def __init__(self):
        self.rows = []

    def on_batch(self, rows, generated_tokens, seconds):
        self.rows.append(rows)


@pytest.fixture(scope="module")
def student(tiny_models):
    with torch_threads(1):
        yield tiny_models[1]


def new_engine(student_dir, **kwargs):
    return EmbeddedEngine(load_model(student_dir), load_tokenizer(student_dir), ModelMeta.read(student_dir).model_id,
                          **kwargs)


@pytest.fixture(scope="module")
def engine(student):
    observer = Batches()
    eng = new_engine(student, max_batch_size=4, batch_wait_ms=300, observer=observer)
    eng.batches = observer
    yield eng
    eng.close()


def row(max_tokens=8, seed=1, temperature=1.0, **kw):
    return RowRequest(PROMPT, DecodeParams(max_tokens=max_tokens, temperature=temperature, seed=seed, **kw))


def run(engine, rows):
    return engine.submit(rows).future.result(60)


def test_concurrent_requests_share_one_batch_and_keep_their_own_seeds(engine):
    alone = run(engine, [row(seed=7)]).rows[0]
    engine.batches.rows.clear()
    jobs = [engine.submit([row(seed=7)]), engine.submit([row(seed=8)]), engine.submit([row(seed=9), row(seed=10)])]
    outs = [j.future.result(60) for j in jobs]
    assert engine.batches.rows == [4]
    together = outs[0].rows[0]
    assert together.completion_ids == alone.completion_ids  # a seed reproduces whatever shares the batch
    assert torch.allclose(torch.tensor(together.logprobs), torch.tensor(alone.logprobs), atol=1e-4)
    assert [len(o.rows) for o in outs] == [1, 1, 2]


def test_batches_never_exceed_the_limit_and_a_request_is_never_split(engine):
    engine.batches.rows.clear()
    jobs = [engine.submit([row(seed=s) for s in range(3)]), engine.submit([row(seed=5), row(seed=6)]),
            engine.submit([row(seed=s) for s in range(6)])]
    assert [len(j.future.result(60).rows) for j in jobs] == [3, 2, 6]
    assert sorted(engine.batches.rows) == [2, 3, 6]  # 3+2 > 4; the 6-row request runs alone


def test_greedy_logs_raw_logprobs_and_alternatives_rank_the_chosen_token_first(engine):
    res = run(engine, [RowRequest(PROMPT, DecodeParams(max_tokens=6, temperature=0), top_logprobs=3)]).rows[0]
    assert res.logprob_kind == "raw"
    for lp in res.logprobs:
        assert lp < 0, res.logprobs
    for tok, lp, alts in zip(res.completion_ids, res.logprobs, res.top_logprobs, strict=True):
        assert len(alts) == 3
        assert alts[0][0] == tok
        assert abs(alts[0][1] - lp) < 1e-4


def test_alternatives_come_from_the_truncated_distribution_that_was_sampled(engine):
    params = DecodeParams(max_tokens=6, temperature=0.8, top_k=2, seed=3)
    res = run(engine, [RowRequest(PROMPT, params, top_logprobs=5)]).rows[0]
    assert res.logprob_kind == "sampled"
    for tok, lp, alts in zip(res.completion_ids, res.logprobs, res.top_logprobs, strict=True):
        assert len(alts) == 2  # top_k=2: the other tokens had probability 0 and are not reported
        assert abs(dict(alts)[tok] - lp) < 1e-4
        assert abs(sum(torch.tensor([a[1] for a in alts]).exp()) - 1) < 1e-4


def test_a_stop_string_ends_the_row_at_the_token_that_completes_it(engine):
    free = run(engine, [row(max_tokens=24, temperature=0)]).rows[0]
    text = decode(engine.tokenizer, free.completion_ids)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    stopped = run(engine, [RowRequest(PROMPT, DecodeParams(max_tokens=24, temperature=0), stop=(stop,))]).rows[0]
    assert stopped.finish_reason == "stop"
    assert len(stopped.completion_ids) < len(free.completion_ids)
    assert stopped.completion_ids == free.completion_ids[: len(stopped.completion_ids)]
    assert stop in decode(engine.tokenizer, stopped.completion_ids)
    assert stop not in decode(engine.tokenizer, stopped.completion_ids[:-1])
    assert final_text(engine.tokenizer, stopped.completion_ids, (stop,)) == text[: text.index(stop)]


def test_adapter_swaps_between_batches_and_a_bad_adapter_keeps_the_old_one(student, tmp_path):
    eng = new_engine(student, batch_wait_ms=0)
    try:
        greedy = [row(max_tokens=8, temperature=0)]
        base = run(eng, greedy)
        v1 = make_adapter(student, tmp_path / "v1", seed=1)
        eng.set_adapter(AdapterInfo("1", v1)).result(30)
        out1 = run(eng, greedy)
        assert out1.adapter_version == "1"
        assert out1.rows[0].completion_ids != base.rows[0].completion_ids
        (tmp_path / "broken").mkdir()
        with pytest.raises(AdapterError):
            eng.set_adapter(AdapterInfo("2", tmp_path / "broken")).result(30)
        again = run(eng, greedy)
        assert again.adapter_version == "1"
        assert again.rows[0].completion_ids == out1.rows[0].completion_ids
        eng.set_adapter(AdapterInfo("3", make_adapter(student, tmp_path / "v3", seed=3))).result(30)
        assert run(eng, greedy).adapter_version == "3"
        assert len(eng._adapters.peft.peft_config) == 1  # the replaced adapter was deleted, not kept in memory
        eng.set_adapter(None).result(30)
        back = run(eng, greedy)
        assert back.adapter_version is None
        assert back.rows[0].completion_ids == base.rows[0].completion_ids
    finally:
        eng.close()


def test_a_failing_batch_fails_its_requests_but_not_the_engine(engine):
    bad = RowRequest((10**6,), DecodeParams(max_tokens=2))  # not in the vocabulary: the forward pass raises
    with pytest.raises(ShadowDistillError, match="generation failed"):
        run(engine, [bad])
    assert engine.is_alive()
    assert len(run(engine, [row()]).rows) == 1


def test_a_cancelled_request_is_dropped_and_a_closed_engine_refuses_work(student):
    eng = new_engine(student, batch_wait_ms=0)
    long_job = eng.submit([row(max_tokens=200, temperature=0)])
    time.sleep(0.05)
    queued = eng.submit([row()])
    queued.cancel()
    long_job.cancel()  # ends its row early too, through the stop check
    assert len(long_job.future.result(60).rows[0].completion_ids) < 200
    with pytest.raises(CancelledError):
        queued.future.result(60)
    eng.close()
    assert not eng.is_alive()
    with pytest.raises(ShadowDistillError):
        eng.submit([row()])


def masked_run(engine):
    """A sampled row whose stop tokens are masked for all of its tokens (min_tokens = max_tokens), with every
    alternative of the distribution each token was drawn from."""
    params = DecodeParams(max_tokens=4, temperature=1.0, seed=5, min_tokens=4)
    return run(engine, [RowRequest(PROMPT, params, top_logprobs=10**6)]).rows[0]


def test_alternatives_under_min_tokens_leave_the_masked_stop_tokens_out(engine):
    res = masked_run(engine)
    assert [engine.eos_ids & {t for t, _ in alts} for alts in res.top_logprobs] == [set()] * 4


def test_alternatives_under_min_tokens_agree_with_the_logged_logprobs(engine):
    res = masked_run(engine)
    picked = [dict(alts)[tok] for tok, alts in zip(res.completion_ids, res.top_logprobs, strict=True)]
    assert picked == pytest.approx(res.logprobs, abs=1e-4)


def test_named_adapters_answer_beside_the_default_one_in_one_mixed_batch(student, tmp_path):
    """vLLM's multi-LoRA: the champion answers the served name, a named adapter the requests that name it, and
    a batch mixing them gives each row exactly what it gets alone."""
    observer = Batches()
    eng = new_engine(student, max_batch_size=4, batch_wait_ms=300, observer=observer)
    try:
        greedy = [row(max_tokens=8, temperature=0)]
        eng.set_adapter(AdapterInfo("1", make_adapter(student, tmp_path / "v1", seed=1))).result(30)
        eng.load_named_adapter(AdapterInfo("7", make_adapter(student, tmp_path / "v7", seed=7))).result(30)
        alone_default, alone_named = run(eng, greedy), eng.submit(greedy, adapter="7").future.result(60)
        observer.rows.clear()
        jobs = [eng.submit(greedy), eng.submit(greedy, adapter="7")]
        mixed_default, mixed_named = (j.future.result(60) for j in jobs)
        assert observer.rows == [2]  # one batch
        assert mixed_default.adapter_version == "1"
        assert mixed_named.adapter_version == "7"
        assert mixed_default.rows[0].completion_ids == alone_default.rows[0].completion_ids
        assert mixed_named.rows[0].completion_ids == alone_named.rows[0].completion_ids
        assert alone_named.rows[0].completion_ids != alone_default.rows[0].completion_ids
        assert set(eng.named_adapters()) == {"7"}
    finally:
        eng.close()


def test_an_unloaded_named_adapter_is_refused_and_the_base_comes_back_without_lora_layers(student, tmp_path):
    eng = new_engine(student, batch_wait_ms=0)
    try:
        greedy = [row(max_tokens=8, temperature=0)]
        base = run(eng, greedy)
        eng.load_named_adapter(AdapterInfo("7", make_adapter(student, tmp_path / "v7", seed=7))).result(30)
        assert run(eng, greedy).rows[0].completion_ids == base.rows[0].completion_ids  # default is still the base
        eng.unload_named_adapter("7").result(30)
        with pytest.raises(ShadowDistillError, match="no adapter named '7'"):
            eng.submit(greedy, adapter="7")
        assert eng._adapters.peft is None
        assert run(eng, greedy).rows[0].completion_ids == base.rows[0].completion_ids
    finally:
        eng.close()


def test_background_work_runs_only_when_no_client_work_waits(student):
    observer = Batches()
    eng = new_engine(student, max_batch_size=2, batch_wait_ms=0, observer=observer)
    try:
        order = []
        blocker = eng.submit([row(max_tokens=6, seed=1)])  # occupies the worker
        background = eng.submit([row(max_tokens=2, seed=2)], background=True)
        clients = [eng.submit([row(max_tokens=2, seed=s)]) for s in (3, 4)]
        for name, job in (("background", background), ("client-3", clients[0]), ("client-4", clients[1])):
            job.future.add_done_callback(lambda _f, n=name: order.append(n))
        for job in (blocker, background, *clients):
            job.future.result(60)
        assert order == ["client-3", "client-4", "background"]
    finally:
        eng.close()


def test_background_work_waits_out_a_short_gap_between_client_requests(student):
    """Closed-loop clients resubmit a few ms after their answers: mirrored work started in that gap held them all."""
    eng = new_engine(student, max_batch_size=2, batch_wait_ms=0, background_idle_ms=500)
    try:
        order = []
        background = eng.submit([row(max_tokens=2, seed=2)], background=True)  # an idle engine
        time.sleep(0.05)
        client = eng.submit([row(max_tokens=2, seed=3)])
        for name, job in (("background", background), ("client", client)):
            job.future.add_done_callback(lambda _f, n=name: order.append(n))
        for job in (background, client):
            job.future.result(60)
        assert order == ["client", "background"]
    finally:
        eng.close()


def test_background_work_rides_along_in_the_free_rows_of_a_client_batch_never_longer_than_it(student):
    observer = Batches()
    eng = new_engine(student, max_batch_size=4, batch_wait_ms=0, observer=observer)
    try:
        running = threading.Event()
        blocker = eng.submit([row(max_tokens=64, seed=1, ignore_eos=True)], on_token=lambda *_: running.set())
        assert running.wait(30)  # the worker is busy with the blocker while the others queue
        short = eng.submit([row(max_tokens=4, seed=2)], background=True)
        longer = eng.submit([row(max_tokens=8, seed=3)], background=True)
        client = eng.submit([row(max_tokens=4, seed=4)])
        for job in (blocker, short, longer, client):
            job.future.result(60)
        assert observer.rows == [1, 2, 1]  # the blocker; the client with the short mirror; the longer one alone
    finally:
        eng.close()
