"""`shadow-distill demo`: the whole shadow loop once, with real components, on this machine.

serve (student, no adapter) -> Kafka (Tansu) -> teacher scorer -> feature store (SQLite)
  -> Airflow DAG via `airflow dags test` (snapshot, on-policy distillation, IFEval + KL gate, MLflow candidate)
  -> reviewer approval (champion alias) -> serving hot-loads the adapter -> fresh traffic is closer to the teacher.

Every process it starts is stopped at the end (also on Ctrl-C or an error). `--tiny` runs the same loop on
tiny random models in about two minutes (what CI's integration test does); the default uses SmolLM2.

    shadow-distill demo                    # about 20 minutes on 2 CPU cores
    shadow-distill demo --tiny --workdir /tmp/demo
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
from pydantic import Field

from foundation.config import StrictConfig

from shadow_distill import demo_traffic as traffic
from shadow_distill.nightly_file import write_nightly_config
from foundation.errors import ShadowDistillError


class DemoConfig(StrictConfig):
    workdir: Path = Field(Path("runs/demo"), description="Each demo writes a timestamped folder under this one.")
    tiny: bool = Field(False, description="Tiny random models instead of SmolLM2 (smoke test, CI).")
    # The sensitivity check's least-sensitive pair (17, 18) barely damages SmolLM2 (held-out reverse KL ~0.24, within
    # the noise of one night); 8 and 21 break its text in a way on-policy distillation visibly repairs (NOTES).
    drop_layers: str = Field("8,21", description="Student = teacher minus these layers ('auto' = the sensitivity "
                                                 "check's least sensitive pair).")
    train_requests: int = Field(64, ge=8, description="Product requests in the training window.")
    eval_requests: int = Field(16, ge=2, description="Held-out requests sent before and after promotion.")
    max_tokens: int = Field(64, ge=4, description="max_tokens of every demo request.")
    concurrency: int = Field(4, ge=1, description="Concurrent client requests.")
    steps: int = Field(24, ge=1, description="Optimizer steps of the nightly distillation.")
    learning_rate: float = Field(2e-4, gt=0, description="LoRA learning rate.")
    rollouts: bool = Field(True, description="Mix fresh on-policy rollouts (scored in-process) into training.")
    ifeval_subset: int | None = Field(None, ge=1, description=(
        "Prompts of the project's IFEval set the gate uses (default: all 240; fewer cannot show non-inferiority)."))
    reviewer: str = Field("demo-reviewer", min_length=1, description="Who approves the candidate.")
    keep_running: bool = Field(False, description="Leave the services up at the end (stop with stack down).")


class Progress:
    def __init__(self, total: int):
        self.t0, self.n, self.total = time.monotonic(), 0, total

    def step(self, text: str) -> None:
        self.n += 1
        print(f"[{self.n}/{self.total} +{time.monotonic() - self.t0:5.0f}s] {text}", flush=True)

    def note(self, text: str) -> None:
        print(f"{'':>14}{text}", flush=True)


def wait_until(predicate, what: str, timeout_s: float, progress: Progress, every_s: float = 2.0):
    deadline, last = time.monotonic() + timeout_s, 0.0
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if time.monotonic() - last > 15:
            progress.note(f"waiting for {what} ...")
            last = time.monotonic()
        time.sleep(every_s)
    raise ShadowDistillError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _dag_progress(line: str, progress: Progress) -> str | None:
    """Show task starts and short-circuits; return the run's final state when this line reports it."""
    if m := re.search(r"\[DAG TEST\] starting task_id=(\w+)", line):
        progress.note(f"DAG task {m.group(1)} ...")
    elif "Skipping downstream tasks" in line and "short_circuit" in line:
        progress.note("DAG short-circuited: downstream tasks skipped")
    elif m := re.search(r"DagRun Finished: .* state=(\w+)", line):
        return m.group(1)
    return None


def run_airflow_dag(workdir: Path, cfg_path: Path, start: datetime, end: datetime, progress: Progress) -> None:
    from shadow_distill.stack import BIN, airflow_env

    env = {**os.environ, **airflow_env(workdir / "airflow", Path(__file__).resolve().parents[1] / "dags", cfg_path),
           "SHADOW_DISTILL_RETRY_DELAY_S": "5"}
    log_path = workdir / "airflow-dags-test.log"
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    conf = json.dumps({"window_start": start.isoformat(), "window_end": end.isoformat()})
    cmd = [str(BIN / "airflow"), "dags", "test", "shadow_distill_nightly", end.strftime("%Y-%m-%dT%H:%M:%S+00:00"),
           "--conf", conf]
    final_state, last_error = None, None
    with open(log_path, "w") as log, subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True) as proc:
        try:
            for line in proc.stdout:
                log.write(line)
                final_state = _dag_progress(line, progress) or final_state
                if re.match(r"[\w.]+(Error|Exception|Interrupt): ", line):  # a task traceback's last line
                    last_error = line.strip()
        except BaseException:  # Ctrl-C or an error: stop Airflow too, or Popen's exit would wait for it
            proc.terminate()
            proc.wait(30)
            raise
        if proc.wait() != 0 or final_state != "success":
            cause = f"; last task error: {last_error}" if last_error else ""
            raise ShadowDistillError(f"airflow dags test ended with exit code {proc.returncode}, run state "
                                     f"{final_state}{cause}; see {log_path}")


def run_demo(cfg: DemoConfig) -> dict:
    from feature_store import FeatureStore
    from message_bus.topics import ensure_trajectory_topics
    from model_registry.registry import Registry
    from model_runtime.models import ModelMeta
    from nightly_train.config import NightlyConfig
    from shadow_distill import stack
    from shadow_distill.models_setup import resolve_models

    for noisy in ("httpx", "httpx2", "kafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    workdir = (cfg.workdir / datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")).resolve()
    workdir.mkdir(parents=True)
    p = Progress(10)
    p.step(f"models ({'tiny' if cfg.tiny else 'SmolLM2-135M-Instruct teacher, layer-dropped student'}); run folder {workdir}")
    teacher_dir, student_dir = resolve_models(tiny=cfg.tiny, workdir=workdir, drop_layers=cfg.drop_layers)
    student_meta, teacher_id = ModelMeta.read(student_dir), ModelMeta.read(teacher_dir).model_id
    p.note(f"student {student_meta.model_id} (dropped layers {list(student_meta.dropped_layers)}), teacher {teacher_id}")
    sup = stack.Supervisor(workdir / "stack")
    store_url = f"sqlite:///{workdir / 'store.db'}"
    api_key = "sk-demo-" + os.urandom(8).hex()
    summary: dict = {"workdir": str(workdir)}
    try:
        p.step("starting Kafka-protocol broker (Tansu) and MLflow server")
        bootstrap, mlflow_uri = stack.start_broker(sup), stack.start_mlflow(sup)
        ensure_trajectory_topics(bootstrap)
        # One night's log is small (~50 training trajectories): re-used for many epochs it is over-fitted once the
        # policy has left the adapter that logged it (importance ratios in the hundreds, held-out KL flat; see
        # docs/distillation-results.md). So: two passes over the log, and most of each step from fresh rollouts.
        rollouts = {"enabled": cfg.rollouts, "per_step": 2 if cfg.tiny else 8, "max_tokens": cfg.max_tokens}
        train_cfg = {"rollouts": rollouts} if cfg.tiny else {
            "max_steps": cfg.steps, "epochs": 2, "batch_size": 4, "learning_rate": cfg.learning_rate,
            "checkpoint_every": 8, "rollouts": rollouts}
        cfg_path = write_nightly_config(workdir, store_url, mlflow_uri, teacher_dir, student_dir, tiny=cfg.tiny,
                                        train=train_cfg,
                                        eval_overrides=None if cfg.tiny or cfg.ifeval_subset is None else {"ifeval_subset": cfg.ifeval_subset})
        nightly = NightlyConfig.from_json_file(cfg_path)
        p.step("starting serving (student, shadow log on) and the teacher scorer")
        serving = stack.start_serving(sup, student_dir, bootstrap, mlflow_uri, nightly.registered_model(), api_key)
        stack.start_scorer(sup, bootstrap, store_url, teacher_dir, student_dir)
        model = student_meta.model_id
        summary["greedy_before"] = traffic.greedy_answer(serving, api_key, model, traffic.GREEDY_PROMPT, cfg.max_tokens)

        p.step(f"held-out traffic before training: {cfg.eval_requests} requests at temperature 1")
        before_start = datetime.now(UTC)
        before = traffic.send_chat(serving, api_key, model, traffic.prompts(traffic.EVAL_TOPICS, cfg.eval_requests),
                                   max_tokens=cfg.max_tokens, temperature=1.0, concurrency=cfg.concurrency, seed0=10_000)
        train_start = datetime.now(UTC)
        p.step(f"product traffic: {cfg.train_requests} requests through the official openai client")
        train = traffic.send_chat(serving, api_key, model, traffic.prompts(traffic.TRAIN_TOPICS, cfg.train_requests),
                                  max_tokens=cfg.max_tokens, temperature=1.0, concurrency=cfg.concurrency)
        train_end = datetime.now(UTC) + timedelta(seconds=1)
        p.note(f"answered {train.ok}/{train.sent} in {train.seconds:.0f} s ({len(train.errors)} errors)")
        served = before.ok + train.ok
        store = FeatureStore.open(store_url)

        p.step("waiting until the scorer has scored every served trajectory")
        wait_until(lambda: store.count_scored(teacher_id) >= served, "teacher scores", 900, p)

        p.step("nightly DAG shadow_distill_nightly via `airflow dags test` (train, IFEval + KL gate, register)")
        run_airflow_dag(workdir, cfg_path, train_start, train_end, p)
        registry = Registry(mlflow_uri, nightly.registered_model())
        candidate = registry.alias("candidate")
        summary.update(_nightly_numbers(nightly, train_start, train_end))
        if candidate is None:
            summary["promoted_version"] = None
            p.step("the gate did not pass: nothing to approve (champion unchanged)")
        else:
            p.step(f"reviewer {cfg.reviewer!r} approves candidate version {candidate.version}")
            registry.approve(candidate.version, cfg.reviewer)
            summary["promoted_version"] = candidate.version
            wait_until(lambda: serving_adapter(serving) == candidate.version, "serving to hot-load the champion", 300, p)
        summary["serving_adapter_version"] = serving_adapter(serving)
        summary["greedy_after"] = traffic.greedy_answer(serving, api_key, model, traffic.GREEDY_PROMPT, cfg.max_tokens)

        p.step("held-out traffic after promotion (same prompts, fresh samples)")
        after_start = datetime.now(UTC)
        after = traffic.send_chat(serving, api_key, model, traffic.prompts(traffic.EVAL_TOPICS, cfg.eval_requests),
                                  max_tokens=cfg.max_tokens, temperature=1.0, concurrency=cfg.concurrency, seed0=20_000)
        served += after.ok
        wait_until(lambda: store.count_scored(teacher_id) >= served, "teacher scores", 900, p)
        summary.update({
            "requests_served": served, "trajectories_stored": store.count_trajectories(),
            "trajectories_scored": store.count_scored(teacher_id),
            "request_errors": before.errors + train.errors + after.errors,
            "traffic_reverse_kl_before": traffic.traffic_reverse_kl(store, teacher_id, before_start, train_start),
            "traffic_reverse_kl_after": traffic.traffic_reverse_kl(store, teacher_id, after_start, None),
        })
    finally:
        if not cfg.keep_running:
            sup.stop_all()
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(render_summary(summary))
    return summary


def serving_adapter(serving: str) -> str | None:
    try:
        return httpx.get(f"{serving}/health", timeout=5).json().get("adapter_version")
    except (httpx.HTTPError, ValueError):
        return None


def _nightly_numbers(nightly, start: datetime, end: datetime) -> dict:
    from nightly_train.layout import RunLayout
    from nightly_train.results import Evaluation

    layout = RunLayout.for_window(nightly.runs_dir, start, end)
    history = layout.history_file
    out: dict = {"training_steps": len(json.loads(history.read_text())) if history.exists() else 0}
    if evaluations := layout.evaluation_files():
        ev = Evaluation.read(evaluations[-1])
        for side in ("champion", "candidate"):
            d, i = ev.side(side).distill, ev.side(side).ifeval
            out[f"heldout_{side}"] = {k: d[k] for k in ("reverse_kl", "reverse_kl_se", "forward_kl", "forward_kl_se",
                                                        "distinct_2")}
            out[f"ifeval_{side}"] = {k: i[k] for k in ("prompt_strict", "prompt_loose", "instruction_strict")}
    return out


def render_summary(s: dict) -> str:
    def kl(t):
        return "n/a" if not t or t[2] == 0 else f"{t[0]:.3f} +- {t[1]:.3f} nats/token ({t[2]} tokens)"

    def side(name):
        h, i = s.get(f"heldout_{name}"), s.get(f"ifeval_{name}")
        if not h:
            return "n/a"
        return (f"reverse KL {h['reverse_kl']:.3f}+-{h['reverse_kl_se']:.3f}, forward KL {h['forward_kl']:.3f}"
                f"+-{h['forward_kl_se']:.3f}, distinct-2 {h['distinct_2']:.2f}, IFEval prompt-strict "
                f"{i['prompt_strict']:.3f}")

    lines = [
        "", "=" * 100, "shadow-distill demo summary", "=" * 100,
        f"requests served            {s.get('requests_served')}   (errors: {len(s.get('request_errors', []))})",
        f"trajectories stored/scored {s.get('trajectories_stored')} / {s.get('trajectories_scored')}",
        f"training steps             {s.get('training_steps')}",
        f"gate, champion (before)    {side('champion')}",
        f"gate, candidate (after)    {side('candidate')}",
        f"traffic reverse KL before  {kl(s.get('traffic_reverse_kl_before'))}",
        f"traffic reverse KL after   {kl(s.get('traffic_reverse_kl_after'))}",
        f"promoted version           {s.get('promoted_version')}",
        f"serving adapter version    {s.get('serving_adapter_version')}",
        f"greedy answer before       {s.get('greedy_before', '')[:300]!r}",
        f"greedy answer after        {s.get('greedy_after', '')[:300]!r}",
        f"run folder                 {s.get('workdir')}", "=" * 100,
    ]
    return "\n".join(lines)
