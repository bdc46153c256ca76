"""The reviewer's page: penalties from the shared scorer, the colour scale, escaping, and the files it writes."""

import html
import math
import re

import pytest
import torch

from model_runtime.logprobs import completion_logprobs
from model_runtime.models import load_model, load_tokenizer
from nightly_train.gate import GateInputs, GatePolicy, HeldoutPerPrompt, evaluate_gate
from nightly_train.review import (
    CURVES_FILE,
    REPORT_FILE,
    ReviewPage,
    gate_checks,
    penalty_colour,
    penalty_scale,
    plot_training_curves,
    render_report,
    render_tokens,
    answer_cases,
    token_penalties,
    token_texts,
    write_review,
)

NASTY = "<script>alert('x')</script> & \"q\""


def side(kl: float, strict: float, answer: str, version=None) -> dict:
    ifeval = {"prompt_strict": strict, "prompt_loose": strict, "instruction_strict": strict,
              "instruction_loose": strict}
    distill = {"reverse_kl": kl, "reverse_kl_se": 0.1, "forward_kl": kl + 1, "forward_kl_se": 0.2,
               "distinct_2": 0.8, "n_tokens": 64.0, "greedy_answer": answer}
    return {"ifeval": ifeval, "distill": distill, "version": version}


EVALUATION = {"candidate": side(0.8, 0.5, NASTY), "champion": side(1.2, 0.5, "plain", "3"), "reference": "champion:v3"}


def gate_tags() -> dict[str, str]:
    """A passing gate: 6 held-out prompts all 0.4 nats better, 40 IFEval prompts unchanged (margin 0.3)."""
    champ = HeldoutPerPrompt((1.2,) * 6, (2.0,) * 6, (0.9,) * 6, "h", 2)
    cand = HeldoutPerPrompt((0.8,) * 6, (2.0,) * 6, (0.9,) * 6, "h", 2)
    strict = [True, False] * 20
    decision = evaluate_gate(GatePolicy(min_prompts=2, ifeval_margin=0.3), GateInputs(
        strict, list(strict), cand, champ, reference="champion:v3"))
    return decision.to_tags()


@pytest.fixture(scope="module")
def models(tiny_models):
    teacher_dir, student_dir = tiny_models
    return load_model(teacher_dir), load_model(student_dir), load_tokenizer(student_dir)


PROMPTS = ("Write a poem about the sea.", "Answer in JSON <b>&amp;</b> format.")


@pytest.fixture(scope="module")
def cases(models):
    teacher, student, tok = models
    rows = [(f"t-{i}", tok.encode(t)) for i, t in enumerate(PROMPTS, start=1)]
    return answer_cases(student, teacher, teacher, tok, rows, max_tokens=9)


def test_token_penalty_is_student_minus_teacher_logprob():
    assert token_penalties([-1.0, -0.5, -3.0], [-2.0, -0.5, -1.0]) == [1.0, 0.0, -2.0]
    with pytest.raises(ValueError):
        token_penalties([-1.0], [-1.0, -2.0])


def test_each_model_is_judged_on_its_own_answer_scored_by_the_shared_scorer(cases, models):
    teacher, student, tok = models
    case = cases[1]
    prompt = [tok.encode(PROMPTS[1])]
    own_C = completion_logprobs(student, prompt, [list(case.before.token_ids)], tok.pad_token_id)[0].logprobs_C
    teacher_C = completion_logprobs(teacher, prompt, [list(case.before.token_ids)], tok.pad_token_id)[0].logprobs_C
    assert torch.allclose(torch.tensor(case.before_penalty), own_C - teacher_C, atol=1e-5)
    assert max(abs(p) for p in case.before_penalty) > 1e-3  # the student with a layer dropped differs


def test_the_after_model_writes_its_own_answer_not_the_befores(cases):
    assert [c.after.token_ids for c in cases] != [c.before.token_ids for c in cases]


def test_an_after_model_that_is_the_teacher_has_no_penalty_on_its_own_answer(cases):
    assert [p for c in cases for p in c.after_penalty if abs(p) >= 1e-5] == []  # "after" = the teacher


def test_answers_keep_their_own_token_texts(cases, models):
    _, _, tok = models
    case = cases[0]
    assert len(case.before.token_texts) == len(case.before.token_ids)
    assert "".join(token_texts(tok, case.before.token_ids)) == tok.decode(list(case.before.token_ids))


def test_colour_darkens_monotonically_with_penalty_and_saturates():
    def lum(rgb):
        return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]

    values = [-1.0, 0.0, 0.1, 0.5, 1.0, 1.5, 2.0, 5.0]
    lums = [lum(penalty_colour(v, vmax=2.0)) for v in values]
    assert all(a >= b for a, b in zip(lums, lums[1:]))
    assert lums[2] > lums[3] > lums[4] > lums[6]  # strictly darker inside the scale
    assert penalty_colour(-1.0, 2.0) == penalty_colour(0.0, 2.0) == (255, 255, 255)
    assert penalty_colour(5.0, 2.0) == penalty_colour(2.0, 2.0) != penalty_colour(1.9, 2.0)
    assert penalty_colour(float("nan"), 2.0) == (255, 255, 255)


def test_token_text_is_escaped_and_round_trips_through_the_tooltip_span():
    out = render_tokens([NASTY, "a\nb", ""], [3.0, 0.5, 0.0], vmax=2.0)
    assert "<script>" not in out
    assert "alert('x')" not in out
    spans = re.findall(r'<span class="tok" style="([^"]*)" title="([^"]*)">([^<]*)</span>', out)
    assert len(spans) == 3
    assert html.unescape(spans[0][2]) == NASTY
    assert "rgb(103,0,13)" in spans[0][0]
    assert "penalty +3.000" in spans[0][1]
    assert html.unescape(spans[1][2]) == "a\u21b5\nb"  # newline visible as a mark, kept as a line break


def test_report_has_both_sides_gate_table_and_escaped_answers(cases):
    page = ReviewPage("Nightly <candidate>", "run-1", EVALUATION, gate_tags(), cases, "champion v3", "candidate")
    out = render_report(page)
    assert "<candidate>" not in out
    assert "Nightly &lt;candidate&gt;" in out
    assert "<script>" not in out
    assert html.escape(NASTY) in out
    n_tokens = sum(len(c.before.token_ids) + len(c.after.token_ids) for c in cases)
    assert out.count('class="tok"') == n_tokens
    assert out.count("before: champion v3") == out.count("after: candidate") == len(cases)
    assert [(n, ok) for n, ok, _ in gate_checks(gate_tags())] == [
        ("ifeval", True), ("kl", True), ("forward_kl", True), ("distinct_2", True), ("finite", True), ("adapter", True)]
    assert "gate PASSED" in out
    assert 'class="better"' in out  # candidate's lower reverse KL is marked better
    assert math.isfinite(penalty_scale(cases))
    assert penalty_scale(cases) > 0


def test_the_paired_tests_table_shows_each_rule_with_its_evidence():
    from nightly_train.review import render_rules

    out = render_rules(gate_tags())
    rows = re.findall(r"<tr><td>([^<]*)</td><td class=\"(pass|fail)\">", out)
    assert rows == [("IFEval prompt-level strict", "pass"), ("held-out reverse KL", "pass"), ("forward KL", "pass"),
                    ("distinct-2", "pass")]
    assert "<th>90% CI</th>" in out
    assert "<td>0.01562</td><td>6 prompts &times; 2</td>" in out  # p = 2^-6 on six prompts of two samples
    assert "improvement &gt; 0 (superiority)" in out


def test_curves_png_and_self_contained_page_are_written(tmp_path, cases):
    history = [{"step": s, "loss": 1.0 / s, "sampled_reverse_kl": 2.0 / s, "advantage_mean": -0.1 * s,
                "ratio_mean": 1.0, "ratio_max": 1.0 + 0.01 * s, "clipped_fraction": 0.0, "topk_loss": float("nan")}
               for s in range(1, 6)]
    png = plot_training_curves(history, tmp_path / "c.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    import matplotlib.image

    pixels = matplotlib.image.imread(png)
    assert len({tuple(p) for p in pixels.reshape(-1, pixels.shape[-1])[::97].tolist()}) > 20
    out = write_review(tmp_path / "review", ReviewPage("t", "r", EVALUATION, gate_tags(), cases, "base", "cand"),
                       history)
    assert (out / CURVES_FILE).stat().st_size > 10_000
    page = (out / REPORT_FILE).read_text()
    assert "data:image/png;base64," in page
    assert 'src="http' not in page
    assert "<link" not in page


def test_the_page_shows_the_live_comparison_of_shadow_mode(cases):
    from nightly_train.live import LiveComparison

    live = [LiveComparison("7", "t1", 40, 0.9, 0.6, -0.3, -0.4, -0.2, 0.95)]
    page = ReviewPage("Nightly", "run-1", EVALUATION, gate_tags(), cases, "champion v3", "candidate", live=live)
    out = render_report(page)
    assert "Live traffic (shadow mode)" in out
    assert "reverse KL (temperature-1 pairs)" in out
    assert 'class="better">-0.3' in out


def test_without_shadow_traffic_the_page_says_there_is_no_live_pair_yet(cases):
    page = ReviewPage("Nightly", "run-1", EVALUATION, gate_tags(), cases, "champion v3", "candidate")
    assert "no live pairs yet" in render_report(page)
