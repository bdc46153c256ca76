"""The local stack: broker, MLflow server, Airflow, serving and scorer as child processes of one folder.

`stack up` starts each service in its own process group, writes `stack.json` (name, PID, port, command, log) in
the folder, and waits until each answers; `stack down` stops exactly the process groups listed there (SIGTERM,
then SIGKILL after a grace period), nothing else; `stack status` says which are alive. The demo and the
integration tests use the same `Supervisor`.

    shadow-distill stack up --dir .stack && shadow-distill stack status --dir .stack
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from message_bus.broker import TansuBroker, free_port, wait_for_port
from foundation.errors import ShadowDistillError

BIN = Path(sys.executable).parent


@dataclass
class ServiceRecord:
    name: str
    pid: int
    port: int | None
    cmd: list[str]
    log: str


class Supervisor:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.state_file = self.folder / "stack.json"
        self.logs = self.folder / "logs"
        self.logs.mkdir(exist_ok=True)

    def records(self) -> dict[str, ServiceRecord]:
        if not self.state_file.exists():
            return {}
        return {k: ServiceRecord(**v) for k, v in json.loads(self.state_file.read_text()).items()}

    def _save(self, records: dict[str, ServiceRecord]) -> None:
        self.state_file.write_text(json.dumps({k: asdict(v) for k, v in records.items()}, indent=1))

    def start(self, name: str, cmd: list[str], *, port: int | None = None, env: dict[str, str] | None = None,
              health_url: str | None = None, timeout_s: float = 120.0) -> ServiceRecord:
        log_path = self.logs / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    env={**os.environ, **(env or {})}, cwd=self.folder)
        rec = ServiceRecord(name, proc.pid, port, cmd, str(log_path))
        records = self.records()
        records[name] = rec
        self._save(records)
        try:
            self._wait_ready(proc, rec, health_url, timeout_s)
        except ShadowDistillError:
            self.stop(name)
            raise
        return rec

    def _wait_ready(self, proc: subprocess.Popen, rec: ServiceRecord, health_url: str | None, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = Path(rec.log).read_text(errors="replace")[-2000:]
                raise ShadowDistillError(f"{rec.name} exited with {proc.returncode} while starting:\n{tail}")
            try:
                if health_url is not None:
                    if httpx.get(health_url, timeout=2).status_code == 200:
                        return
                elif rec.port is not None:
                    wait_for_port("127.0.0.1", rec.port, timeout_s=0.5)
                    return
                else:
                    return
            except (httpx.HTTPError, ShadowDistillError):
                pass
            time.sleep(0.5)
        raise ShadowDistillError(f"{rec.name} did not become ready in {timeout_s:.0f} s; see {rec.log}")

    @staticmethod
    def alive(rec: ServiceRecord) -> bool:
        try:
            os.kill(rec.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a zombie child (exited, not yet reaped) is not alive
            return Path(f"/proc/{rec.pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return True

    def signal(self, name: str, sig: int) -> None:
        rec = self.records()[name]
        os.killpg(rec.pid, sig)

    def stop(self, name: str, grace_s: float = 20.0) -> None:
        records = self.records()
        rec = records.pop(name, None)
        if rec is None:
            return
        if self.alive(rec):
            try:
                os.killpg(rec.pid, signal.SIGCONT)
                os.killpg(rec.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace_s
            while self.alive(rec) and time.monotonic() < deadline:
                time.sleep(0.2)
                _reap(rec.pid)
            if self.alive(rec):
                try:
                    os.killpg(rec.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _reap(rec.pid)
        self._save(records)

    def stop_all(self) -> None:
        for name in reversed(list(self.records())):
            self.stop(name)


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


# ---- service commands ----------------------------------------------------------------------------------------
def start_broker(sup: Supervisor) -> str:
    port = free_port()
    sup.start("broker", TansuBroker(port).command(), port=port)
    return f"127.0.0.1:{port}"


def start_mlflow(sup: Supervisor) -> str:
    port = free_port()
    db = (sup.folder / "mlflow.db").resolve()
    artifacts = (sup.folder / "mlartifacts").resolve()
    sup.start("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{db}",
                         "--artifacts-destination", str(artifacts), "--serve-artifacts",
                         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
              port=port, health_url=f"http://127.0.0.1:{port}/health", timeout_s=180)
    return f"http://127.0.0.1:{port}"


def write_keys_file(folder: Path, api_key: str) -> Path:
    """The serving keys file (sha256 only) for `api_key`: the key itself never reaches a command line, which any
    local user can read with `ps`, nor `stack.json`."""
    from serving.auth import hash_key

    path = (folder / "api_keys.json").resolve()
    path.write_text(json.dumps({"keys": [{"name": "local", "sha256": hash_key(api_key), "shadow_log": True}]}))
    return path


def start_serving(sup: Supervisor, student_dir: Path, bootstrap: str, mlflow_uri: str, model_name: str,
                  api_key: str, poll_s: float = 2.0, extra: list[str] | None = None) -> str:
    port = free_port()
    keys_file = write_keys_file(sup.folder, api_key)
    cmd = [str(BIN / "shadow-distill"), "serve", "--model-dir", str(student_dir), "--port", str(port),
           "--kafka-bootstrap", bootstrap, "--spool-dir", str((sup.folder / "spool").resolve()),
           "--mlflow-tracking-uri", mlflow_uri, "--registry-model-name", model_name,
           "--adapter-poll-s", str(poll_s), "--adapters-root", str((sup.folder / "adapters").resolve()),
           "--api-keys-file", str(keys_file), "--torch-threads", "1", *(extra or [])]
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    sup.start("serving", cmd, port=port, env=env, health_url=f"http://127.0.0.1:{port}/health", timeout_s=180)
    return f"http://127.0.0.1:{port}"


def start_scorer(sup: Supervisor, bootstrap: str, store_url: str, teacher_dir: Path,
                 student_dir: Path | None = None) -> None:
    """The scorer on the teacher folder, storing the teacher's top-k (the config's default, 20). With
    `student_dir` it is told the student's tokenizer and refuses a teacher that does not share it."""
    cmd = [str(BIN / "shadow-distill"), "score", "run", "--bootstrap-servers", bootstrap, "--store-url", store_url,
           "--teacher", str(teacher_dir), "--session-timeout-ms", "6000", "--batch-tokens", "4096"]
    if student_dir is not None:
        cmd += ["--student-tokenizer", str(student_dir)]
    sup.start("scorer", cmd, env={"OMP_NUM_THREADS": "1"})


def start_airflow(sup: Supervisor, dags_dir: Path, nightly_config: Path) -> str:
    port = free_port()
    env = airflow_env(sup.folder / "airflow", dags_dir, nightly_config)
    env["AIRFLOW__API__PORT"] = str(port)
    # standalone starts its components as `airflow ...` subprocesses: they must find this venv's airflow
    env["PATH"] = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    sup.start("airflow", [str(BIN / "airflow"), "standalone"], port=port, env=env, timeout_s=300)
    return f"http://127.0.0.1:{port}"


def airflow_env(home: Path, dags_dir: Path, nightly_config: Path) -> dict[str, str]:
    return {"AIRFLOW_HOME": str(home.resolve()), "AIRFLOW__CORE__DAGS_FOLDER": str(dags_dir.resolve()),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "SHADOW_DISTILL_NIGHTLY_CONFIG": str(nightly_config.resolve())}


# ---- CLI ---------------------------------------------------------------------------------------------------
def cmd_up(args) -> None:
    from message_bus.topics import ensure_trajectory_topics
    from shadow_distill.nightly_file import write_nightly_config
    from shadow_distill.models_setup import resolve_models

    sup = Supervisor(Path(args.dir))
    if sup.records():
        raise ShadowDistillError(f"a stack already runs from {args.dir}; `shadow-distill stack down` first")
    teacher_dir, student_dir = resolve_models(tiny=args.tiny, workdir=sup.folder)
    store_url = f"sqlite:///{(sup.folder / 'store.db').resolve()}"
    try:
        bootstrap = start_broker(sup)
        ensure_trajectory_topics(bootstrap)  # the partition count is chosen here, not by broker auto-creation
        mlflow_uri = start_mlflow(sup)
        cfg_path = write_nightly_config(sup.folder, store_url, mlflow_uri, teacher_dir, student_dir, tiny=args.tiny)
        from nightly_train.config import NightlyConfig

        model_name = NightlyConfig.from_json_file(cfg_path).registered_model()
        key = os.environ.get("SHADOW_DISTILL_API_KEY", "sk-local-" + os.urandom(8).hex())
        serving = start_serving(sup, student_dir, bootstrap, mlflow_uri, model_name, key)
        start_scorer(sup, bootstrap, store_url, teacher_dir, student_dir)
        airflow = start_airflow(sup, Path(__file__).resolve().parents[1] / "dags", cfg_path)
    except Exception:
        sup.stop_all()
        raise
    key_path = sup.folder / "api_key"
    key_path.touch(mode=0o600)
    key_path.chmod(0o600)  # also when an earlier `stack up` left the file behind
    key_path.write_text(key)
    print(json.dumps({"broker": bootstrap, "mlflow": mlflow_uri, "serving": serving, "airflow": airflow,
                      "api_key_file": str(key_path), "nightly_config": str(cfg_path)}, indent=1))


def cmd_down(args) -> None:
    sup = Supervisor(Path(args.dir))
    names = list(sup.records())
    sup.stop_all()
    print(json.dumps({"stopped": names}))


def cmd_status(args) -> None:
    sup = Supervisor(Path(args.dir))
    print(json.dumps({n: {"pid": r.pid, "port": r.port, "alive": sup.alive(r), "log": r.log}
                      for n, r in sup.records().items()}, indent=1))
