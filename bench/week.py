"""A simulated week of nights: does the loop keep learning on production-like traffic, night after night?

Real parts throughout: the serving endpoint (embedded engine, following the registry's champion), the Kafka-
protocol broker, the scorer, the SQLite feature store, an MLflow server and, per night, the nightly DAG under
`airflow dags test`. Each night:
- traffic comes from that night's champion, with mixed decoding: 40% greedy, 30% temperature 0.7, 30%
  temperature 1 (every tenth request asks for n = 2 choices), prompts from `--prompts` (default: the project's own
  demo topics, never IFEval's);
- one night (`--scorer-stop-night`) the scorer is stopped halfway through the traffic and started again only after
  the DAG began: its sensor must wait, and the night must still freeze the whole window;
- one night (`--manual-night`) half of the requests name an adapter loaded by hand through /v1/load_lora_adapter
  (`exp-7`, unknown to the registry): the night must still train;
- one night (`--rollback-night`) a reviewer rolls the champion back before the traffic;
- a passed gate is approved by the reviewer and serving hot-loads it.
After each night the champion is measured on a fixed held-out set of prompts that traffic never sends (reverse
KL on the student's own temperature-1 samples, forward KL on the teacher's, distinct-2): night 0 is the student
before any night. One row per night, a PNG of the curves, and on the last line the ratio of the last night's
held-out reverse KL to night 0's (target on this machine: <= 0.35, forward KL <= 0.50 of night 0's, distinct-2
no more than 0.02 below, no partial window, no crash, the week <= 75 minutes).

    .venv/bin/python bench/week.py                        # SmolLM2 pair, 5 nights, about an hour on 2 cores
    .venv/bin/python bench/week.py --tiny --nights 3 --rollback-night 3 --manual-night 2 --scorer-stop-night 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from foundation.errors import RegistryError  # noqa: E402
from message_bus.topics import ensure_topics  # noqa: E402
from nightly_train.layout import interval_key  # noqa: E402
from schemas.trajectory import DEAD_LETTER_TOPIC, DEFAULT_TOPIC  # noqa: E402
from shadow_distill import demo_traffic, stack  # noqa: E402
from shadow_distill.demo import Progress, run_airflow_dag, serving_adapter, wait_until  # noqa: E402
from shadow_distill.models_setup import resolve_models  # noqa: E402
from shadow_distill.nightly_file import write_nightly_config  # noqa: E402

ADMIN_TOKEN = "week-bench-admin-" + os.urandom(6).hex()
API_KEY = "sk-week-" + os.urandom(8).hex()
REVIEWER = "week-reviewer"
MANUAL = "exp-7"
DECODING = [0.0] * 4 + [0.7] * 3 + [1.0] * 3  # request i uses DECODING[i % 10]; i % 10 == 9 asks for n = 2


@dataclass
class Night:
    night: int
    served: int = 0
    landed: int = 0
    scored: int = 0
    manifest: int = 0
    partial: bool = False
    tokens: dict[str, float] = field(default_factory=dict)
    stale_dropped: int = 0
    unknown_policy: int = 0
    reverse_kl: float = float("nan")
    reverse_kl_se: float = float("nan")
    forward_kl: float = float("nan")
    distinct_2: float = float("nan")
    gate_ifeval: float | None = None
    gate_passed: bool | None = None
    promoted: str | None = None
    champion: str | None = None
    events: list[str] = field(default_factory=list)
    error: str | None = None
    wall_s: float = 0.0


def read_prompts(path: Path | None) -> tuple[list[str], list[str]]:
    """(traffic prompts, held-out prompts): a JSONL file's `prompt` fields (or text lines), else the demo topics."""
    if path is None:
        return (demo_traffic.prompts(demo_traffic.TRAIN_TOPICS, 80),
                demo_traffic.prompts(demo_traffic.EVAL_TOPICS, 16))
    lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()]
    texts = [json.loads(ln)["prompt"] if ln.startswith("{") else ln for ln in lines]
    if len(texts) < 24:
        raise SystemExit(f"--prompts {path}: {len(texts)} prompts; at least 24 are needed (8 are held out)")
    held = max(8, len(texts) // 6)
    return texts[:-held], texts[-held:]


def send_traffic(serving: str, texts: list[str], *, max_tokens: int, concurrency: int, seed0: int,
                 manual_share: float = 0.0) -> int:
    """Mixed-decoding chat requests through the official client; returns the choices answered."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{serving}/v1", api_key=API_KEY, max_retries=2, timeout=600)
    base = httpx.get(f"{serving}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}).json()["data"][0]["id"]

    def one(i: int) -> int:
        model = MANUAL if manual_share and (i % 2 == 0) else base
        try:
            r = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": texts[i]}], max_tokens=max_tokens,
                temperature=DECODING[i % 10], seed=seed0 + i, n=2 if i % 10 == 9 else 1)
            return len(r.choices)
        except Exception as exc:  # counted by the caller as a missing answer; printed so it is seen
            print(f"    request {i} failed: {type(exc).__name__}: {exc}", flush=True)
            return 0

    with ThreadPoolExecutor(concurrency) as pool:
        return sum(pool.map(one, range(len(texts))))


def admin(serving: str, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{serving}/v1/{path}", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


class Meter:
    """The champion on the fixed held-out prompts, loaded fresh each time from the registry's version folder."""

    def __init__(self, cfg, texts: list[str], max_tokens: int):
        from model_runtime.chat import user_prompt_ids
        from model_runtime.models import load_model, load_tokenizer

        self.cfg, self.max_tokens = cfg, max_tokens
        self.tok = load_tokenizer(cfg.student_dir)
        self.prompts = [user_prompt_ids(self.tok, t) for t in texts]
        self.teacher = load_model(cfg.teacher_dir)

    def measure(self, adapter_dir: Path | None):
        from nightly_train.evaluate import evaluate_distillation, student_with_adapter

        model = student_with_adapter(self.cfg.student_dir, adapter_dir)
        return evaluate_distillation(model, self.teacher, self.tok, self.prompts, max_tokens=self.max_tokens, seed=7)


def night_numbers(cfg, row: Night, start: datetime, end: datetime) -> None:
    """What landed, was scored, frozen and trained on in the night's window (store and MLflow)."""
    from mlflow import MlflowClient

    from feature_store import shared_store
    from nightly_train.layout import RunLayout
    from nightly_train.pipeline import RUN_TAG
    from nightly_train.results import Evaluation

    store = shared_store(cfg.store_url)
    row.landed = store.count_trajectories(start, end)
    row.scored = store.count_scored(cfg.teacher_id, start, end)
    manifest = store.get_manifest(interval_key(start, end))
    row.manifest = 0 if manifest is None else manifest.n_train + manifest.n_heldout
    row.partial = manifest is not None and row.manifest != row.scored
    client = MlflowClient(cfg.mlflow_tracking_uri)
    exp = client.get_experiment_by_name(cfg.experiment)
    runs = [] if exp is None else client.search_runs([exp.experiment_id],
                                                     f"tags.`{RUN_TAG}` = '{interval_key(start, end)}'")
    if runs:
        metrics = runs[0].data.metrics
        row.tokens = {k.removeprefix("train.tokens_total."): v for k, v in metrics.items()
                      if k.startswith("train.tokens_total.")}
        row.stale_dropped = int(metrics.get("data.trajectories.excluded_stale_no_topk", 0))
        row.unknown_policy = int(metrics.get("data.policies.unknown", 0))
        row.gate_passed = runs[0].data.tags.get("gate.passed") == "true"
    if files := RunLayout.for_window(cfg.runs_dir, start, end).evaluation_files():
        row.gate_ifeval = float(Evaluation.read(files[-1]).candidate.ifeval["prompt_strict"])


def run_week(args) -> list[Night]:
    from model_registry.registry import Registry
    from nightly_train.config import NightlyConfig

    for noisy in ("httpx", "kafka", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    workdir = (args.workdir / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")).resolve()
    workdir.mkdir(parents=True)
    progress = Progress(0)
    teacher_dir, student_dir = resolve_models(tiny=args.tiny, workdir=workdir, drop_layers=args.drop_layers)
    traffic_texts, heldout_texts = read_prompts(args.prompts)
    os.environ["SHADOW_DISTILL_ADMIN_TOKEN"] = ADMIN_TOKEN  # serving inherits it: exp-7 is loaded through it
    os.environ.setdefault("SHADOW_DISTILL_CALLER_SALT", "week-bench-salt-" + os.urandom(8).hex())
    sup = stack.Supervisor(workdir / "stack")
    rows: list[Night] = []
    week_started = time.monotonic()
    try:
        bootstrap, mlflow_uri = stack.start_broker(sup), stack.start_mlflow(sup)
        ensure_topics(bootstrap, {DEFAULT_TOPIC: 4, DEAD_LETTER_TOPIC: 1})
        rollouts = {"enabled": True, "per_step": 2 if args.tiny else 8, "max_tokens": args.max_tokens}
        train = {"rollouts": rollouts} if args.tiny else {
            "max_steps": args.steps, "epochs": 2, "batch_size": 4, "learning_rate": args.learning_rate,
            "checkpoint_every": 8, "rollouts": rollouts}
        evals = None if args.tiny else {"kl_samples_per_prompt": args.kl_samples}
        cfg_path = write_nightly_config(workdir, f"sqlite:///{workdir / 'store.db'}", mlflow_uri, teacher_dir,
                                        student_dir, tiny=args.tiny, train=train, eval_overrides=evals)
        cfg = NightlyConfig.from_json_file(cfg_path)
        serving = stack.start_serving(sup, student_dir, bootstrap, mlflow_uri, cfg.registered_model(), API_KEY)
        stack.start_scorer(sup, bootstrap, cfg.store_url, teacher_dir, student_dir)
        registry = Registry(mlflow_uri, cfg.registered_model())
        meter = Meter(cfg, heldout_texts, args.meter_tokens)
        base = meter.measure(None)
        rows.append(Night(0, reverse_kl=base.reverse_kl, reverse_kl_se=base.reverse_kl_se,
                          forward_kl=base.forward_kl, distinct_2=base.distinct_2, events=["the student before any night"]))
        print(render_row(rows[-1]), flush=True)
        for k in range(1, args.nights + 1):
            rows.append(run_night(k, args, cfg, cfg_path, workdir, sup, serving, registry, meter, traffic_texts,
                                  bootstrap, progress))
            print(render_row(rows[-1]), flush=True)
    finally:
        sup.stop_all()
    wall = time.monotonic() - week_started
    (workdir / "week.json").write_text(json.dumps([asdict(r) for r in rows], indent=1, default=str))
    plot(rows, workdir / "week.png")
    print(f"week: {len(rows) - 1} nights in {wall / 60:.1f} min; results in {workdir}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": [asdict(r) for r in rows], "wall_s": wall,
                                                   "workdir": str(workdir)}, default=str))
    return rows


def run_night(k, args, cfg, cfg_path, workdir, sup, serving, registry, meter, texts, bootstrap, progress) -> Night:
    row, started = Night(k), time.monotonic()
    if k == args.rollback_night:
        try:
            back = registry.rollback(REVIEWER)
            wait_until(lambda: serving_adapter(serving) == back.version, "serving to follow the rollback", 300,
                       progress)
            row.events.append(f"rollback to v{back.version}")
        except RegistryError as exc:  # fewer than two approvals so far: nothing to roll back to
            row.events.append(f"no rollback: {exc}")
    manual = k == args.manual_night and registry.champion() is not None
    if k == args.manual_night and not manual:
        row.events.append(f"no champion to copy as {MANUAL}: its traffic is skipped")
    if manual:
        folder = Path(sup.folder / "adapters" / MANUAL)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(registry.download_adapter(registry.champion().version, workdir / "exp-7-source"), folder)
        response = admin(serving, "load_lora_adapter", {"lora_name": MANUAL, "lora_path": str(folder)})
        row.events.append(f"{MANUAL} loaded by hand ({response.status_code})")
    per_night = args.requests
    chunk = [texts[(k * per_night + i) % len(texts)] for i in range(per_night)]
    start = datetime.now(UTC)
    restart: threading.Timer | None = None
    if k == args.scorer_stop_night:
        half = per_night // 2
        row.served += send_traffic(serving, chunk[:half], max_tokens=args.max_tokens, concurrency=args.concurrency,
                                   seed0=k * 10_000, manual_share=0.5 if manual else 0.0)
        sup.stop("scorer")
        row.events.append("scorer stopped mid-traffic")
        row.served += send_traffic(serving, chunk[half:], max_tokens=args.max_tokens, concurrency=args.concurrency,
                                   seed0=k * 10_000 + half, manual_share=0.5 if manual else 0.0)
        restart = threading.Timer(args.scorer_down_s, lambda: stack.start_scorer(sup, bootstrap, cfg.store_url,
                                                                                 cfg.teacher_dir, cfg.student_dir))
    else:
        row.served += send_traffic(serving, chunk, max_tokens=args.max_tokens, concurrency=args.concurrency,
                                   seed0=k * 10_000, manual_share=0.5 if manual else 0.0)
    end = datetime.now(UTC) + timedelta(seconds=1)
    time.sleep(1.5)
    if manual:
        admin(serving, "unload_lora_adapter", {"lora_name": MANUAL})
    if restart is not None:
        restart.start()  # the DAG's sensor starts while the scorer is still down
    try:
        run_airflow_dag(workdir / f"night-{k}", cfg_path, start, end, progress)
    except Exception as exc:  # a crashed night is counted and the week goes on
        row.error = f"{type(exc).__name__}: {exc}"[:500]
    if restart is not None:
        restart.join()
        row.events.append(f"scorer restarted {args.scorer_down_s:.0f} s after the DAG began")
    night_numbers(cfg, row, start, end)
    candidate = registry.alias("candidate")
    if candidate is not None and candidate.tags.get("interval_key") == interval_key(start, end):
        registry.approve(candidate.version, REVIEWER)
        wait_until(lambda: serving_adapter(serving) == candidate.version, "serving to hot-load the champion", 300,
                   progress)
        row.promoted = candidate.version
    champ = registry.champion()
    row.champion = champ.version if champ else None
    measured = meter.measure(None if champ is None else
                             registry.download_adapter(champ.version, workdir / f"meter-n{k}-v{champ.version}"))
    row.reverse_kl, row.reverse_kl_se = measured.reverse_kl, measured.reverse_kl_se
    row.forward_kl, row.distinct_2 = measured.forward_kl, measured.distinct_2
    row.wall_s = time.monotonic() - started
    return row


def render_row(r: Night) -> str:
    tokens = " ".join(f"{k}={int(v)}" for k, v in sorted(r.tokens.items())) or "-"
    ifeval = "-" if r.gate_ifeval is None else f"{r.gate_ifeval:.3f}"
    return (f"night {r.night}: served {r.served} landed {r.landed} scored {r.scored} frozen {r.manifest}"
            f"{' PARTIAL' if r.partial else ''} | trained {tokens} | stale dropped {r.stale_dropped} unknown "
            f"{r.unknown_policy} | held-out rKL {r.reverse_kl:.3f}+-{r.reverse_kl_se:.3f} fKL {r.forward_kl:.3f} "
            f"distinct-2 {r.distinct_2:.3f} | gate IFEval {ifeval} passed {r.gate_passed} promoted {r.promoted} "
            f"champion {r.champion} | {r.wall_s / 60:.1f} min{' | ' + '; '.join(r.events) if r.events else ''}"
            f"{' | ERROR ' + r.error if r.error else ''}")


def plot(rows: list[Night], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nights = [r.night for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    for ax, (title, values) in zip(axes, (("held-out reverse KL", [r.reverse_kl for r in rows]),
                                          ("held-out forward KL", [r.forward_kl for r in rows]),
                                          ("distinct-2", [r.distinct_2 for r in rows]))):
        ax.plot(nights, values, marker="o")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("night")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def summary(rows: list[Night]) -> list[str]:
    first, last = rows[0], rows[-1]
    return [f"forward KL last/night0: {last.forward_kl / first.forward_kl:.3f}; distinct-2 last - night0: "
            f"{last.distinct_2 - first.distinct_2:+.3f}; partial windows: {sum(r.partial for r in rows)}; "
            f"crashed nights: {sum(r.error is not None for r in rows)}",
            f"held-out reverse KL last/night0: {last.reverse_kl / first.reverse_kl:.3f}"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny random models (the CI-sized week)")
    p.add_argument("--nights", type=int, default=5)
    p.add_argument("--requests", type=int, default=64, help="requests per night (20%% of the prompts are held out)")
    p.add_argument("--prompts", type=Path, default=None, help="JSONL (a `prompt` per line) or plain text lines")
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--meter-tokens", type=int, default=48, help="sampled tokens per held-out prompt")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per night (SmolLM2)")
    p.add_argument("--kl-samples", type=int, default=4, help=(
        "samples per held-out prompt and side in the gate's paired KL tests (SmolLM2; the demo's 2 leave an MDE of "
        "~0.3 nats/token over 10 prompts)"))
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--drop-layers", default="8,21", help="the student: SmolLM2 minus these layers")
    p.add_argument("--scorer-stop-night", type=int, default=2)
    p.add_argument("--scorer-down-s", type=float, default=45.0, help="scorer down this long after the DAG began")
    p.add_argument("--manual-night", type=int, default=3)
    p.add_argument("--rollback-night", type=int, default=4)
    p.add_argument("--workdir", type=Path, default=Path("runs/week"))
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a stopped week still stops every process it started
    rows = run_week(args)
    for line in summary(rows):
        print(line)


if __name__ == "__main__":
    main()
