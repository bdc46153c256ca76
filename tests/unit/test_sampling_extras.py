"""vLLM's sampling extras in the shared sampler (model_runtime.sampling): min_p, min_tokens, ignore_eos and
stop_token_ids, checked against hand-computed values on a fake model whose next-token logits never change."""

import math
from types import SimpleNamespace

import pytest
import torch

from model_runtime.sampling import DecodeParams, process_logits, sample, suppress_stops

EOS, PAD = 1, 0
# Token 5 is the favourite, then EOS, then 3; the rest are far behind.
LOGITS = torch.tensor([-9.0, 2.0, -9.0, 1.0, -9.0, 3.0])


class FixedLM(torch.nn.Module):
    """Every position predicts LOGITS, whatever came before."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, cache=None, **_):
        B, L = input_ids.shape
        return SimpleNamespace(logits=LOGITS.expand(B, L, -1).clone(), cache=cache)


def run(**params):
    p = DecodeParams(**{"max_tokens": 4, "temperature": 0.0, **params})
    return sample(FixedLM(), [[2, 3]], [p], eos_ids={EOS}, pad_id=PAD)[0]


def log_softmax(values):
    z = math.log(sum(math.exp(v) for v in values))
    return [v - z for v in values]


def test_min_p_cuts_tokens_below_its_share_of_the_top_probability():
    # p(EOS) / p(5) = e^-1 = 0.37 and p(3) / p(5) = e^-2 = 0.14: min_p 0.2 keeps 5 and EOS only.
    kept = process_logits(LOGITS, DecodeParams(max_tokens=1, min_p=0.2)).exp()
    assert kept.nonzero().flatten().tolist() == [EOS, 5]


def test_min_p_renormalises_what_it_keeps():
    logp = process_logits(LOGITS, DecodeParams(max_tokens=1, min_p=0.2))
    assert logp[5].item() == pytest.approx(log_softmax([3.0, 2.0])[0], abs=1e-6)


def test_stop_tokens_are_masked_only_until_min_tokens_are_out():
    p = DecodeParams(max_tokens=4, min_tokens=2, stop_token_ids=(3,))
    masked = [torch.isinf(suppress_stops(LOGITS, p, n, {EOS})[[EOS, 3]]).all().item() for n in range(3)]
    assert masked == [True, True, False]


def test_the_sampled_logprob_under_min_tokens_is_that_of_the_masked_distribution():
    res = run(temperature=1.0, min_tokens=4, seed=0)
    others = [v for i, v in enumerate(LOGITS.tolist()) if i != EOS]
    expected = {tok: lp for tok, lp in zip([i for i in range(6) if i != EOS], log_softmax(others), strict=True)}
    assert res.sampled_logprobs == pytest.approx([expected[t] for t in res.completion_ids], abs=1e-6)


def test_greedy_without_extras_stops_at_nothing_but_max_tokens():
    assert (run().completion_ids, run().finish_reason) == ([5, 5, 5, 5], "length")


def test_a_stop_token_id_ends_the_row_like_eos():
    res = run(stop_token_ids=(5,))
    assert (res.completion_ids, res.finish_reason) == ([5], "stop")


def test_min_tokens_holds_every_stop_token_back_until_enough_tokens_are_out():
    res = run(stop_token_ids=(5,), min_tokens=2)  # 5 and EOS masked twice: 3 is the best left
    assert (res.completion_ids, res.finish_reason) == ([3, 3, 5], "stop")


class EOSFirstLM(FixedLM):
    """EOS is the favourite."""

    def forward(self, input_ids, cache=None, **_):
        B, L = input_ids.shape
        logits = torch.full((B, L, 6), -5.0)
        logits[..., EOS] = 5.0
        return SimpleNamespace(logits=logits, cache=cache)


def run_eos_first(**params):
    p = DecodeParams(max_tokens=3, temperature=0.0, **params)
    return sample(EOSFirstLM(), [[2]], [p], eos_ids={EOS}, pad_id=PAD)[0]


def test_eos_ends_a_row():
    res = run_eos_first()
    assert (res.completion_ids, res.finish_reason) == ([EOS], "stop")


def test_ignore_eos_samples_on_past_eos():
    res = run_eos_first(ignore_eos=True)
    assert (res.completion_ids, res.finish_reason) == ([EOS, EOS, EOS], "length")
