"""Token alignment: completion token j is scored by the logits at position P - 1 + j, in every code path."""

import pytest
import torch

from model_runtime.chat import user_prompt_ids
from model_runtime.logprobs import completion_logits, completion_logprobs, left_pad, token_logprobs
from model_runtime.models import load_model, load_tokenizer
from model_runtime.sampling import DecodeParams, process_logits, sample


def _setup(tiny_models):
    teacher_dir, _ = tiny_models
    return load_model(teacher_dir), load_tokenizer(teacher_dir)


def test_logprob_of_completion_token_j_comes_from_position_p_minus_1_plus_j(tiny_models):
    model, tok = _setup(tiny_models)
    prompt, completion = [5, 9, 14, 3], [7, 11, 2]
    with torch.no_grad():
        logits_LV = model(input_ids=torch.tensor([prompt + completion])).logits[0]
    expected = [torch.log_softmax(logits_LV[len(prompt) - 1 + j], -1)[t].item() for j, t in enumerate(completion)]
    got = completion_logprobs(model, [prompt], [completion], tok.pad_token_id)[0].logprobs_C.tolist()
    assert got == pytest.approx(expected, abs=1e-5)
    # The classic off-by-one (position P + j) gives different numbers: the test would catch it.
    wrong = [torch.log_softmax(logits_LV[len(prompt) + j], -1)[t].item() for j, t in enumerate(completion[:-1])]
    assert max(abs(a - b) for a, b in zip(wrong, expected)) > 1e-3


def test_left_padded_batch_matches_single_rows(tiny_models):
    model, tok = _setup(tiny_models)
    prompts = [[5, 9, 14, 3], [8, 2], [4, 4, 4, 4, 4, 4, 4]]
    completions = [[7, 11, 2], [6], [1, 2, 3, 4, 5]]
    batched = completion_logprobs(model, prompts, completions, tok.pad_token_id, topk=3)
    for p, c, b in zip(prompts, completions, batched):
        single = completion_logprobs(model, [p], [c], tok.pad_token_id, topk=3)[0]
        assert b.logprobs_C.shape == (len(c),)
        assert torch.allclose(b.logprobs_C, single.logprobs_C, atol=2e-5)
        assert torch.equal(b.topk_ids_CK, single.topk_ids_CK)


def test_position_ids_follow_the_attention_mask():
    batch = left_pad([[1, 2, 3], [4]], pad_id=0)
    assert batch.attention_mask_BL.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch.position_ids_BL.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_sampled_raw_logprobs_match_a_forward_pass_and_generate(tiny_models):
    model, tok = _setup(tiny_models)
    prompts = [user_prompt_ids(tok, "hello"), user_prompt_ids(tok, "Write a poem about the sea, please")]
    params = [DecodeParams(max_tokens=6, temperature=1.0, seed=1), DecodeParams(max_tokens=4, temperature=0.0)]
    results = sample(model, prompts, params, eos_ids=set(), pad_id=tok.pad_token_id)
    scored = completion_logprobs(model, prompts, [r.completion_ids for r in results], tok.pad_token_id)
    for r, s in zip(results, scored):
        assert torch.allclose(s.logprobs_C, torch.tensor(r.raw_logprobs), atol=2e-5)
    out = model.generate(torch.tensor([prompts[1]]), max_new_tokens=4, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    greedy = out.sequences[0, len(prompts[1]):].tolist()
    assert results[1].completion_ids == greedy
    ref = [torch.log_softmax(sc[0], -1)[t].item() for sc, t in zip(out.scores, greedy)]
    assert torch.allclose(torch.tensor(results[1].raw_logprobs), torch.tensor(ref), atol=2e-5)
    assert results[1].behaviour(0.0)[0] == "raw"
    assert results[0].behaviour(1.0)[0] == "sampled"


def test_sampled_logprobs_are_those_of_the_processed_distribution(tiny_models):
    model, tok = _setup(tiny_models)
    prompt = user_prompt_ids(tok, "hello there")
    p = DecodeParams(max_tokens=5, temperature=0.7, top_k=20, top_p=0.9, seed=3)
    r = sample(model, [prompt], [p], eos_ids=set(), pad_id=tok.pad_token_id)[0]
    cl = completion_logits(model, [prompt], [r.completion_ids], tok.pad_token_id)
    for j, t in enumerate(r.completion_ids):
        expected = process_logits(cl.logits_BCV[0, j], p)[t].item()
        assert abs(expected - r.sampled_logprobs[j]) < 1e-4
        assert r.sampled_logprobs[j] > -1e9  # a sampled token is inside the top-k/top-p support
    assert torch.allclose(token_logprobs(cl.logits_BCV, cl.completion_ids_BC)[0], torch.tensor(r.raw_logprobs), atol=2e-5)


def test_seed_reproduces_a_completion_whatever_shares_the_batch(tiny_models):
    model, tok = _setup(tiny_models)
    a = user_prompt_ids(tok, "hello")
    p = DecodeParams(max_tokens=8, temperature=1.0, seed=42)
    alone = sample(model, [a], [p], eos_ids=set(), pad_id=tok.pad_token_id)[0]
    together = sample(model, [user_prompt_ids(tok, "Answer in JSON"), a], [DecodeParams(max_tokens=3, seed=1), p],
                      eos_ids=set(), pad_id=tok.pad_token_id)[1]
    assert alone.completion_ids == together.completion_ids
