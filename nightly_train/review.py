"""The reviewer's page for one candidate: gate table, training curves, and where the teacher's penalty fell.

A reviewer approving `champion` should not have to read MLflow tags. Each nightly run gets one self-contained
HTML page (inline CSS, the PNG embedded as base64 and also written beside it), logged as the run's `review/`
artifact folder and openable from disk:
- the gate's checks, its paired tests (what each must show, the improvement with its interval, p, n, the minimum
  detectable effect) and the candidate-vs-champion table (IFEval's four metrics, held-out reverse/forward KL,
  distinct-2, greedy answers) from the gate tags and the `Evaluation` that `pipeline.evaluate` returns;
- training curves (loss, sampled reverse KL, advantage, importance-ratio stats per step) from
  `<runs_dir>/<interval>/train_history.json`;
- the live comparison of the candidate in shadow mode against the champion on the same live requests
  (`nightly_train.live`), once there is one (rebuild the page after shadow traffic);
- a token heatmap of the teacher's per-token penalty `log p_model(y_t) - log p_teacher(y_t)` on each model's *own*
  answer to a few held-out prompts: the model *before* (champion, or base on the first night) and *after* training
  (candidate) each answer at temperature 1 with the same seed. Darker = larger penalty, one span per token, the
  number in its tooltip: the case study in shared/reference/on-policy-distillation.md, per night.

Pure parts (penalties from logprobs, colours, HTML) are separate from the I/O (`build_review`); the nightly DAG
runs it as its own task after the gate (`pipeline.review`), and the CLI can rebuild a night's page:

    shadow-distill nightly review --config nightly.json --start 2026-11-24T02:00Z --end 2026-11-25T02:00Z
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from nightly_train.gate import rules_from_tags
from nightly_train.layout import RunLayout
from nightly_train.results import Evaluation, GateOutcome

if TYPE_CHECKING:
    from feature_store import ScoredTrajectory

REPORT_FILE, CURVES_FILE = "index.html", "training_curves.png"
_WHITE, _DARK = (255, 255, 255), (103, 0, 13)  # both ends of the penalty scale (matplotlib "Reds")
_CURVE_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("loss", ("loss",)),
    ("sampled reverse KL (nats/token)", ("sampled_reverse_kl", "rollout_reverse_kl", "gkd_reverse_kl")),
    ("advantage (mean)", ("advantage_mean",)),
    ("importance ratio", ("ratio_mean", "ratio_max", "clipped_fraction")),
)


# ---- pure: penalties -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Answer:
    """One model's own answer to a held-out prompt, and the teacher's judgement of each of its tokens."""

    token_ids: tuple[int, ...]
    token_texts: tuple[str, ...]
    own_lp: tuple[float, ...]
    teacher_lp: tuple[float, ...]

    @property
    def penalty(self) -> list[float]:
        return token_penalties(self.own_lp, self.teacher_lp)


@dataclass(frozen=True)
class PenaltyCase:
    """One held-out prompt answered by the model before (champion, or the base) and after training (candidate)."""

    trajectory_id: str
    prompt_text: str
    before: Answer
    after: Answer

    @property
    def before_penalty(self) -> list[float]:
        return self.before.penalty

    @property
    def after_penalty(self) -> list[float]:
        return self.after.penalty


def token_penalties(student_lp_C: Sequence[float], teacher_lp_C: Sequence[float]) -> list[float]:
    """Per-token reverse-KL estimate on sampled tokens: log p_student(y_t) - log p_teacher(y_t)."""
    if len(student_lp_C) != len(teacher_lp_C):
        raise ValueError(f"{len(student_lp_C)} student logprobs for {len(teacher_lp_C)} teacher logprobs")
    return [float(s) - float(t) for s, t in zip(student_lp_C, teacher_lp_C)]


def token_texts(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (a byte-level piece of a multi-byte character shows as U+FFFD)."""
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in token_ids]


def _answers(model, teacher, tokenizer, prompts: list[list[int]], *, max_tokens: int, seed: int) -> list[Answer]:
    """`model`'s own temperature-1 answers (seed + i for prompt i) and the teacher's logprobs of their tokens.

    `teacher`: a model of the student's tokenizer or a `TeacherBridge` (another tokenizer: each token shows its
    span's share, and an answer that cannot be aligned is left empty)."""
    from model_runtime.models import eos_token_ids
    from model_runtime.sampling import DecodeParams, sample
    from nightly_train.evaluate import as_bridge

    params = [DecodeParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i) for i in range(len(prompts))]
    results = sample(model, prompts, params, eos_ids=eos_token_ids(tokenizer, model), pad_id=tokenizer.pad_token_id)
    out = [Answer((), (), (), ())] * len(prompts)
    kept = [i for i, r in enumerate(results) if r.completion_ids]
    if kept:
        scored = as_bridge(teacher, tokenizer).score([prompts[i] for i in kept],
                                                     [results[i].completion_ids for i in kept])
        for i, t in zip(kept, scored, strict=True):
            ids = results[i].completion_ids
            if t is not None:
                out[i] = Answer(tuple(ids), tuple(token_texts(tokenizer, ids)), tuple(results[i].sampled_logprobs),
                                tuple(t.teacher_logprobs_C.tolist()))
    return out


def answer_cases(before_model, after_model, teacher, tokenizer, prompts: Sequence[tuple[str, list[int]]], *,
                 max_tokens: int = 64, seed: int = 0) -> list[PenaltyCase]:
    """Each model answers every (id, prompt ids) itself at temperature 1, with the same seed for both (as the
    held-out meter samples), and the teacher scores every token: what each model writes, not a replay of old
    logged tokens under a model that never wrote them."""
    rows = [(tid, list(p)) for tid, p in prompts if p]
    if not rows:
        return []
    ids = [p for _, p in rows]
    before = _answers(before_model, teacher, tokenizer, ids, max_tokens=max_tokens, seed=seed)
    after = _answers(after_model, teacher, tokenizer, ids, max_tokens=max_tokens, seed=seed)
    return [PenaltyCase(tid, tokenizer.decode(p, skip_special_tokens=True), b, a)
            for (tid, p), b, a in zip(rows, before, after, strict=True)]


def penalty_scale(cases: Sequence[PenaltyCase]) -> float:
    """One colour scale for every heatmap (before and after alike): the 98th percentile of positive penalties."""
    positive = sorted(p for c in cases for p in (*c.before_penalty, *c.after_penalty) if p > 0 and math.isfinite(p))
    return positive[min(len(positive) - 1, int(0.98 * len(positive)))] if positive else 1.0


def penalty_colour(penalty: float, vmax: float) -> tuple[int, int, int]:
    """White for no penalty (or a token the teacher likes more), darkest red at `vmax` and above."""
    t = 0.0 if not math.isfinite(penalty) or vmax <= 0 else min(max(penalty / vmax, 0.0), 1.0)
    return tuple(round(w + (d - w) * t) for w, d in zip(_WHITE, _DARK))  # type: ignore[return-value]


# ---- pure: HTML ------------------------------------------------------------------------------------------
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _fmt(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else _e(x)


def render_tokens(texts: Sequence[str], penalties: Sequence[float], vmax: float) -> str:
    """One `<span>` per token, background by penalty, tooltip with the number; every text is escaped."""
    spans = []
    for j, (text, pen) in enumerate(zip(texts, penalties, strict=True)):
        r, g, b = penalty_colour(pen, vmax)
        ink = "#fff" if (0.299 * r + 0.587 * g + 0.114 * b) < 140 else "#111"
        shown = text.replace("\n", "\u21b5\n") if text else "\u2205"
        spans.append(f'<span class="tok" style="background:rgb({r},{g},{b});color:{ink}" '
                     f'title="token {j}: penalty {pen:+.3f} nats">{_e(shown)}</span>')
    return "".join(spans)


def _legend(vmax: float) -> str:
    stops = [penalty_colour(vmax * k / 4, vmax) for k in range(5)]
    gradient = ",".join(f"rgb({r},{g},{b})" for r, g, b in stops)
    return (f'<div class="legend"><span>0</span><span class="bar" style="background:linear-gradient(90deg,'
            f'{gradient})"></span><span>&ge; {vmax:.2f} nats</span></div>')


def render_case(case: PenaltyCase, vmax: float, before_label: str, after_label: str) -> str:
    rows = []
    for label, answer in ((f"before: {before_label}", case.before), (f"after: {after_label}", case.after)):
        pens = answer.penalty
        mean = sum(pens) / len(pens) if pens else float("nan")
        tokens = render_tokens(answer.token_texts, pens, vmax) if pens else '<span class="muted">(empty answer)</span>'
        rows.append(f'<div class="side"><div class="label">{_e(label)} <span class="muted">mean {mean:.3f} '
                    f'nats/token over its own {len(pens)} tokens</span></div><div class="tokens">{tokens}</div></div>')
    return (f'<div class="case"><div class="muted">trajectory {_e(case.trajectory_id)}</div>'
            f'<div class="prompt">{_e(case.prompt_text[-400:])}</div>{"".join(rows)}</div>')


def gate_checks(gate_tags: Mapping[str, str]) -> list[tuple[str, bool, str]]:
    """(name, passed, detail) of each check, from `GateDecision.to_tags()` (in its order)."""
    return [(n, r["passed"] == "true", r.get("detail", "")) for n, r in rules_from_tags(gate_tags).items()]


def _metric_rows(evaluation: Mapping[str, Any]) -> list[tuple[str, Any, Any, bool | None]]:
    """(metric, candidate, champion, candidate better?) for the comparison table."""
    rows: list[tuple[str, Any, Any, bool | None]] = []
    cand, champ = evaluation["candidate"], evaluation["champion"]
    for name in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose"):
        a, b = float(cand["ifeval"][name]), float(champ["ifeval"][name])
        rows.append((f"IFEval {name.replace('_', ' ')}", a, b, None if a == b else a > b))
    for name, lower_better in (("reverse_kl", True), ("forward_kl", True), ("distinct_2", False)):
        a, b = float(cand["distill"][name]), float(champ["distill"][name])
        se_a, se_b = cand["distill"].get(f"{name}_se"), champ["distill"].get(f"{name}_se")
        shown_a = f"{a:.4g} &plusmn; {se_a:.2g}" if isinstance(se_a, float) else f"{a:.4g}"
        shown_b = f"{b:.4g} &plusmn; {se_b:.2g}" if isinstance(se_b, float) else f"{b:.4g}"
        better = None if a == b or not (math.isfinite(a) and math.isfinite(b)) else (a < b) == lower_better
        rows.append((name.replace("_", " "), shown_a, shown_b, better))
    rows.append(("held-out sampled tokens", int(cand["distill"]["n_tokens"]), int(champ["distill"]["n_tokens"]), None))
    return rows


_RULE_TITLES = {"ifeval": "IFEval prompt-level strict", "kl": "held-out reverse KL", "forward_kl": "forward KL",
                "distinct_2": "distinct-2"}


def _num(text: str | None) -> str:
    try:
        return f"{float(text):.4g}"
    except (TypeError, ValueError):
        return _e(text or "")


def render_rules(gate_tags: Mapping[str, str]) -> str:
    """One row per paired test: what it must show, the effect with its interval, p against alpha, n and the MDE.
    Effects are improvements (positive = candidate better), so every rule reads the same way."""
    alpha = gate_tags.get("gate.policy.alpha", "")
    ci = f"{100 * (1 - 2 * float(alpha)):.4g}% CI" if alpha else "CI"
    rows = []
    for name, r in rules_from_tags(gate_tags).items():
        if "p_value" not in r:
            continue  # finite and adapter have no statistic: the checks table shows them
        ok = r.get("passed") == "true"
        n = _e(r.get("n", ""))
        if r.get("samples_per_prompt"):
            n += f" prompts &times; {_e(r['samples_per_prompt'])}"
        rows.append(f'<tr><td>{_e(_RULE_TITLES.get(name, name))}</td><td class="{"pass" if ok else "fail"}">'
                    f'{"PASS" if ok else "FAIL"}</td><td>{_e(r.get("required", ""))}</td>'
                    f'<td>{_num(r.get("effect"))}</td><td>[{_num(r.get("ci_low"))}, {_num(r.get("ci_high"))}]</td>'
                    f'<td>{_num(r.get("p_value"))}</td><td>{n}</td><td>{_num(r.get("mde"))}</td>'
                    f'<td class="muted">{_e(r.get("method", ""))}</td></tr>')
    if not rows:
        return ""
    return (f'<h3>Paired tests, candidate vs champion (alpha {_e(alpha)})</h3><table class="rules"><tr><th>rule</th>'
            f'<th>result</th><th>must show</th><th>improvement</th><th>{ci}</th><th>p</th><th>n</th><th>MDE</th>'
            f'<th>test</th></tr>{"".join(rows)}</table><p class="muted">Improvement = champion minus candidate for the '
            f'KLs, candidate minus champion for distinct-2 and IFEval (positive = candidate better), per prompt. '
            f'MDE: the effect this many prompts detect with 80% power (IFEval: the non-inferiority margin a truly '
            f'equal candidate passes at the observed discordance).</p>')


def render_gate(evaluation: Mapping[str, Any], gate_tags: Mapping[str, str]) -> str:
    checks = "".join(f'<tr><td>{_e(n)}</td><td class="{"pass" if ok else "fail"}">{"PASS" if ok else "FAIL"}</td>'
                     f'<td>{_e(d)}</td></tr>' for n, ok, d in gate_checks(gate_tags))
    metrics = "".join(
        f'<tr><td>{_e(name)}</td><td class="{"" if better is None else ("better" if better else "worse")}">'
        f'{a if isinstance(a, str) else _fmt(a)}</td><td>{b if isinstance(b, str) else _fmt(b)}</td></tr>'
        for name, a, b, better in _metric_rows(evaluation))
    reference = _e(evaluation.get("reference", "champion"))
    answers = "".join(f'<div class="answer"><div class="label">{label}</div><pre>'
                      f'{_e(evaluation[side]["distill"].get("greedy_answer", ""))}</pre></div>'
                      for side, label in (("champion", reference), ("candidate", "candidate")))
    return (f'<h2>Gate</h2><table><tr><th>check</th><th>result</th><th>detail</th></tr>{checks}</table>'
            f'{render_rules(gate_tags)}'
            f'<h2>Candidate vs {reference}</h2><table><tr><th>metric</th><th>candidate</th><th>{reference}</th>'
            f'</tr>{metrics}</table><h3>Greedy answer</h3><div class="answers">{answers}</div>')


_CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;
color:#1d1d1f;background:#fafafa;padding:0 20px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:14px;margin:16px 0 6px}.muted{color:#6e6e73;font-size:12px}
.badge{display:inline-block;padding:3px 12px;border-radius:12px;color:#fff;font-weight:600;margin-left:8px}
.badge.pass{background:#1a7f37}.badge.fail{background:#cf222e}
table{border-collapse:collapse;background:#fff;width:100%}td,th{border:1px solid #e1e1e6;padding:5px 9px;
text-align:left;vertical-align:top}th{background:#f2f2f5}
td.pass{color:#1a7f37;font-weight:600}td.fail{color:#cf222e;font-weight:600}
td.better{background:#e6f4ea}td.worse{background:#fdecea}
.answers{display:flex;gap:12px}.answer{flex:1;background:#fff;border:1px solid #e1e1e6;padding:8px}
pre{white-space:pre-wrap;margin:4px 0;font-size:12px}img{max-width:100%;background:#fff;border:1px solid #e1e1e6}
.case{background:#fff;border:1px solid #e1e1e6;padding:10px 12px;margin:12px 0}
.prompt{font-size:12px;color:#444;background:#f6f6f8;padding:6px;margin:6px 0;white-space:pre-wrap}
.side{margin-top:8px}.label{font-weight:600;font-size:12px;margin-bottom:3px}
.tokens{font:13px/1.9 ui-monospace,Menlo,Consolas,monospace;white-space:pre-wrap;word-break:break-word}
.tok{padding:1px 0;border-right:1px solid rgba(0,0,0,.09)}
.legend{display:flex;align-items:center;gap:8px;font-size:12px}.legend .bar{width:240px;height:12px;
border:1px solid #ccc}
"""


@dataclass(frozen=True)
class ReviewPage:
    """Everything the page shows, already computed."""

    title: str
    run_id: str
    evaluation: Mapping[str, Any]
    gate_tags: Mapping[str, str]
    cases: Sequence[PenaltyCase]
    before_label: str
    after_label: str
    curves_png: bytes | None = None
    live: Sequence[Any] = ()  # nightly_train.live.LiveComparison: the candidate in shadow on live traffic


def render_report(page: ReviewPage) -> str:
    passed = page.gate_tags.get("gate.passed") == "true"
    vmax = penalty_scale(page.cases)
    curves = (f'<img alt="training curves" src="data:image/png;base64,{base64.b64encode(page.curves_png).decode()}">'
              if page.curves_png else '<p class="muted">no training history</p>')
    cases = "".join(render_case(c, vmax, page.before_label, page.after_label) for c in page.cases)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(page.title)}</title>'
            f'<style>{_CSS}</style></head><body><h1>{_e(page.title)}<span class="badge {"pass" if passed else "fail"}'
            f'">gate {"PASSED" if passed else "FAILED"}</span></h1><div class="muted">MLflow run {_e(page.run_id)}'
            f'</div>{render_gate(page.evaluation, page.gate_tags)}<h2>Training</h2>{curves}'
            f'{render_live(page.live)}'
            f'<h2>Where the teacher penalises the student</h2><p class="muted">Per token: log p_model(y) - '
            f'log p_teacher(y) on each model\'s own answer to a held-out prompt (temperature 1, the same seed for '
            f'both); darker = larger penalty, hover a token for its value.</p>{_legend(vmax)}'
            f'{cases or "<p class=muted>no held-out trajectories</p>"}</body></html>')


def render_live(comparisons: Sequence[Any]) -> str:
    """The candidate in shadow mode against the champion on the same live requests (`nightly_train.live`)."""
    if not comparisons:
        return ('<h2>Live traffic (shadow mode)</h2><p class="muted">no live pairs yet: put the candidate in shadow '
                '(POST /v1/shadow) and rebuild this page (shadow-distill nightly review) once its answers are '
                'scored</p>')
    rows = "".join(
        f'<tr><td>{_e(c.label)}</td><td>{c.n_pairs}</td><td>{c.champion_mean:.4g}</td><td>{c.candidate_mean:.4g}</td>'
        f'<td class="{"better" if c.candidate_better else ("worse" if c.ci_low > 0 else "")}">{c.difference:+.4g} '
        f'({c.confidence:.0%} CI {c.ci_low:+.3g} .. {c.ci_high:+.3g})</td></tr>' for c in comparisons)
    return ('<h2>Live traffic (shadow mode)</h2><p class="muted">Each model\'s own answers to the same live requests '
            '(same sampling parameters and seeds), per token log p_model(y) - log p_teacher(y); difference = '
            'candidate - champion, negative = closer to the teacher, paired by request.</p><table><tr><th>metric'
            '</th><th>pairs</th><th>champion</th><th>candidate</th><th>difference</th></tr>' + rows + '</table>')


# ---- I/O -------------------------------------------------------------------------------------------------
def plot_training_curves(history: Sequence[Mapping[str, float]], out_png: Path) -> Path:
    """A 2x2 PNG of the per-step training metrics (panels with nothing logged say so)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), dpi=100)
    for ax, (title, keys) in zip(axes.flat, _CURVE_PANELS):
        drawn = False
        for key in keys:
            pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), float | int)
                   and math.isfinite(h[key])]
            if pts:
                ax.plot(*zip(*pts), marker="o" if len(pts) < 30 else None, ms=3, label=key)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged in this run", ha="center", va="center", color="#888", transform=ax.transAxes)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def write_review(out_dir: Path, page: ReviewPage, history: Sequence[Mapping[str, float]]) -> Path:
    """Write `out_dir/index.html` (self-contained) and `out_dir/training_curves.png`; returns `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_training_curves(history, out_dir / CURVES_FILE).read_bytes() if history else None
    (out_dir / REPORT_FILE).write_text(render_report(replace(page, curves_png=png)),
                                       encoding="utf-8")
    return out_dir


def build_review(student_dir: Path, teacher_dir: Path, layout: RunLayout, evaluation: Evaluation,
                 outcome: GateOutcome, heldout: Sequence[ScoredTrajectory], *, champion_dir: Path | None,
                 max_tokens: int = 64, live: Sequence[Any] = ()) -> Path:
    """Write `layout.review_dir` for a night: champion and candidate answering the held-out prompts themselves,
    the teacher judging each token, and the live shadow comparison when there is one."""
    from model_runtime.models import eos_token_ids, load_tokenizer, pick_device
    from nightly_train.evaluate import student_with_adapter
    from nightly_train.teacher_bridge import TeacherBridge

    history = json.loads(layout.history_file.read_text()) if layout.history_file.exists() else []
    prompts = list({tuple(t.prompt_ids): (t.trajectory_id, t.prompt_ids) for t in heldout}.values())
    tok = load_tokenizer(student_dir)
    with torch.no_grad():
        cases = answer_cases(student_with_adapter(student_dir, champion_dir),
                             student_with_adapter(student_dir, layout.adapter_dir),
                             TeacherBridge.load(teacher_dir, tok, eos_token_ids(tok), pick_device("auto")), tok,
                             prompts, max_tokens=max_tokens)
    champ_version = evaluation.champion.version
    before = f"champion v{champ_version}" if champ_version else "student base"
    page = ReviewPage(f"Nightly candidate {layout.interval_key}", evaluation.run_id, evaluation.model_dump(),
                      outcome.tags, cases, before, "candidate", live=live)
    return write_review(layout.review_dir, page, history)
