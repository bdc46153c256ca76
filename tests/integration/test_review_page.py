"""The reviewer's page as a browser shows it: rendered from tiny models, screenshotted by headless Chromium.

Needs the Debian package `chromium` (/usr/bin/chromium); skips with that reason where it is absent.
"""

import subprocess
from pathlib import Path

import pytest
import torch

from model_runtime.chat import user_prompt_ids
from model_runtime.models import load_model, load_tokenizer
from nightly_train.gate import GateInputs, GatePolicy, HeldoutPerPrompt, evaluate_gate
from nightly_train.live import LiveComparison
from nightly_train.review import REPORT_FILE, ReviewPage, answer_cases, write_review
from tests.support.serving import make_adapter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
CHROMIUM = Path("/usr/bin/chromium")
DARK = (103, 0, 13)  # the darkest penalty colour
WIDTH, HEIGHT = 1280, 2800  # tall enough for the gate's tables, the curves and the first heatmaps


def side(kl: float, strict: float, answer: str, version=None) -> dict:
    ifeval = {"prompt_strict": strict, "prompt_loose": strict + 0.05, "instruction_strict": strict + 0.1,
              "instruction_loose": strict + 0.12}
    distill = {"reverse_kl": kl, "reverse_kl_se": 0.08, "forward_kl": kl * 2, "forward_kl_se": 0.2,
               "distinct_2": 0.7, "n_tokens": 512.0, "greedy_answer": answer}
    return {"ifeval": ifeval, "distill": distill, "version": version}


@pytest.fixture(scope="module")
def report(tiny_models, tmp_path_factory) -> Path:
    """A page for a random 'candidate' adapter vs the tiny student base, on the student's own samples."""
    teacher_dir, student_dir = tiny_models
    tmp = tmp_path_factory.mktemp("review")
    tok = load_tokenizer(student_dir)
    teacher, base = load_model(teacher_dir), load_model(student_dir)
    from peft import PeftModel

    candidate = PeftModel.from_pretrained(load_model(student_dir), make_adapter(student_dir, tmp / "a", seed=3,
                                                                               scale=0.3)).eval()
    prompts = [user_prompt_ids(tok, t) for t in ("Write a poem about the sea.", "List two colors <b>& one</b> animal.",
                                                 "Explain a neural network in lowercase.")]
    with torch.no_grad():
        cases = answer_cases(base, candidate, teacher, tok, [(f"traj-{i}", p) for i, p in enumerate(prompts)],
                             max_tokens=40)
    champ = HeldoutPerPrompt((1.4, 1.3, 1.5, 1.2, 1.45, 1.35), (2.8,) * 6, (0.7,) * 6, "h", 4)
    cand = HeldoutPerPrompt((0.9, 0.95, 0.85, 1.0, 0.8, 0.97), (1.9,) * 6, (0.72,) * 6, "h", 4)
    tags = evaluate_gate(GatePolicy(min_prompts=2, ifeval_margin=0.5), GateInputs(
        [True, True, False], [True, False, False], cand, champ, reference="base:tiny")).to_tags()
    evaluation = {"candidate": side(0.91, 0.42, "The sea <is> wide & deep."), "champion": side(1.37, 0.4, "sea sea"),
                  "reference": "base:tiny"}
    history = [{"step": s, "loss": 0.8 / s + 0.05, "sampled_reverse_kl": 1.4 / s ** 0.5, "advantage_mean": -0.5 / s,
                "ratio_mean": 1.0 + 0.02 / s, "ratio_max": 1.3 - 0.02 * s, "clipped_fraction": 0.1 / s}
               for s in range(1, 13)]
    live = [LiveComparison("2", "t1", 48, 1.21, 0.93, -0.28, -0.37, -0.19, 0.95),
            LiveComparison("2", "greedy", 112, 0.64, 0.55, -0.09, -0.14, -0.04, 0.95)]
    page = ReviewPage("Nightly candidate 20261124T020000Z-20261125T020000Z", "0123abcd", evaluation, tags, cases,
                      "student base", "candidate", live=live)
    return write_review(tmp / "review", page, history) / REPORT_FILE


def screenshot(page: Path, out: Path, profile: Path) -> Path:
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={WIDTH},{HEIGHT}", page.as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert out.exists(), proc.stderr[-2000:]
    return out


def test_chromium_renders_the_page_with_a_heatmap(report, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is absent: apt-get install -y chromium")
    from PIL import Image

    png = screenshot(report, tmp_path / "page.png", tmp_path / "profile")
    image = Image.open(png).convert("RGB")
    assert image.size == (WIDTH, HEIGHT)
    pixels = list(image.getdata())
    assert len(set(pixels)) > 500  # text, table, curves and heatmap, not a blank or error page
    near_dark = sum(1 for p in pixels if sum(abs(a - b) for a, b in zip(p, DARK)) < 40)
    assert near_dark > 200  # at least a few darkest-penalty token boxes are on screen
    white = sum(1 for p in pixels if p == (255, 255, 255) or p == (250, 250, 250))
    assert white < 0.9 * len(pixels)


def test_the_page_carries_the_live_comparison_and_each_models_own_answers(report):
    text = report.read_text()
    assert "Live traffic (shadow mode)" in text
    assert "greedy teacher penalty" in text
    assert "each model&#x27;s own answer" in text or "each model's own answer" in text
