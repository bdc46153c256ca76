"""The MLflow model registry of the distilled adapters: candidate -> champion (by a reviewer) -> rollback.

One registered model per student base; each nightly run that trained an adapter becomes one model version
(its source is the run's `adapter/` artifact folder). Three aliases carry the state, and MLflow is the only
place it lives (no cache here), so an alias a reviewer moves in the MLflow UI counts the same as one moved here:

- `candidate`: the newest version that passed the gate; set by the pipeline only.
- `champion`:  what serving loads; set only by a named reviewer, only on a version tagged `gate.passed=true`
  (a move made directly in the MLflow UI bypasses these checks: MLflow permissions decide who may do that).
- `previous`:  the champion before the last approval, for one-command rollback. After a rollback it points at
  the version just demoted, so a second rollback undoes the first.

Every action appends a JSON entry (`audit.NNNN` = {action, actor, at, details}) to the version's tags, and every
alias move appends one to the registered model's tags (`model_registry.audit`). An alias moved outside
shadow-distill (the MLflow UI) leaves a position no entry explains: `reconcile_aliases` (run by every action here
and by serving's champion poll) appends its entry with actor "unknown (...)", the time it was noticed and the
version's gate tags, and, for a champion move, sets `previous` to the champion before it as `approve` does, so a
UI approval can be rolled back like any other. MLflow cannot say who moved an alias, nor when. Tags never hold URIs with credentials or secret-looking
keys: such tags are refused. Version tags are written before aliases move, so an approval or rollback that
failed before its alias moves is completed by running it again (with a repeated audit entry). Audit numbers are
read-then-written: two writers acting in the same instant could overwrite one entry (approvals are human-paced;
the nightly registration is one Airflow task).

    reg = Registry("http://127.0.0.1:5000", model_name="smollm2-135m-keep28")
    v = reg.register_candidate(run_id, tags={"gate.ifeval_prompt_strict": "0.41"}, gate_passed=True,
                               interval_key="2025-06-01")
    reg.approve(v.version, reviewer="alice")          # champion <- v, previous <- old champion
    reg.rollback(actor="bob")                         # champion <- previous
    reg.download_adapter(reg.champion().version, Path("adapters/v7"))
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow.artifacts
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.exceptions import MlflowException

from foundation.errors import RegistryError
from model_registry.audit import (
    AUDIT_PREFIX,
    MLFLOW_KNOWS,
    UNKNOWN_ACTOR,
    audit_entries,
    audit_entry,
    audit_key,
    gate_evidence,
    next_audit_key,
    unexplained,
    utc_now,
)

log = logging.getLogger(__name__)

ALIAS_CANDIDATE = "candidate"
ALIAS_CHAMPION = "champion"
ALIAS_PREVIOUS = "previous"
PIPELINE_IDENTITY = "shadow-distill-pipeline"
ADAPTER_ARTIFACT = "adapter"

TAG_GATE_PASSED = "gate.passed"
TAG_INTERVAL_KEY = "interval_key"
TAG_APPROVED_BY = "approved_by"
TAG_APPROVED_AT = "approved_at"
TAG_ROLLED_BACK_BY = "rolled_back_by"
TAG_ROLLED_BACK_AT = "rolled_back_at"
TAG_PARENT = "parent_version"  # the champion a version was trained from; "" = the student base
RESERVED_TAGS = frozenset({TAG_GATE_PASSED, TAG_INTERVAL_KEY, TAG_APPROVED_BY, TAG_APPROVED_AT,
                           TAG_ROLLED_BACK_BY, TAG_ROLLED_BACK_AT, TAG_PARENT})

_NOT_FOUND = "RESOURCE_DOES_NOT_EXIST"
_SECRET_KEY = re.compile(r"secret|passw|api[_.-]?key|access[_.-]?key|private[_.-]?key|credential|auth[_.-]?token"
                         r"|authorization|bearer|(^|[_.-])token$", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"://[^/\s:@]+:[^/\s@]+@|\bbearer\s+\S|\b(sk|hf|ghp|gho|xox[abp])[-_][A-Za-z0-9]{8,}",
                           re.IGNORECASE)
# Interpolated into MLflow filter strings, so no quotes or backslashes.
_SAFE_FILTER_VALUE = re.compile(r"[^'\"\\`]{1,250}")


@dataclass(frozen=True)
class VersionInfo:
    """One model version as MLflow holds it right now."""

    version: str
    run_id: str | None
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()

    @property
    def gate_passed(self) -> bool:
        return self.tags.get(TAG_GATE_PASSED) == "true"

    @classmethod
    def from_mlflow(cls, mv: ModelVersion) -> VersionInfo:
        return cls(version=str(mv.version), run_id=mv.run_id or None, source=mv.source,
                   tags=dict(mv.tags or {}), aliases=tuple(sorted(mv.aliases or ())))


# ---- pure helpers -------------------------------------------------------------------------------------------

def check_no_secret(key: str, value: str) -> None:
    """Refuse a tag that looks like it carries a credential. The message names the key, never the value."""
    if _SECRET_KEY.search(key) or _SECRET_VALUE.search(value):
        raise RegistryError(f"tag {key!r} looks like it carries a secret (credential key name, URI with "
                            "user:password, or a token); secrets never go into MLflow tags")


def check_caller_tags(tags: dict[str, str]) -> None:
    for key, value in tags.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise RegistryError(f"tag {key!r}: keys and values must be str, got {type(value).__name__}")
        if key in RESERVED_TAGS or key.startswith(AUDIT_PREFIX):
            raise RegistryError(f"tag {key!r} is reserved for the registry; choose another key")
        check_no_secret(key, value)


def check_person(name: str, *, action: str, role: str) -> str:
    """A named actor: not empty, not secret-looking. Returns it stripped."""
    name = (name or "").strip()
    if not name:
        raise RegistryError(f"{action}: the {role} is empty; name the person acting")
    check_no_secret("actor", name)
    return name


def parse_version(version: str | int) -> str:
    text = str(version).strip()
    if not text.isdigit() or int(text) < 1:
        raise RegistryError(f"model version {version!r} is not a positive integer")
    return str(int(text))


@dataclass
class _ModelState:
    """The registered model's aliases (alias -> version) and tags, as read once within one action."""

    aliases: dict[str, str]
    tags: dict[str, str]

    @classmethod
    def from_mlflow(cls, model: RegisteredModel) -> _ModelState:
        return cls({k: str(v) for k, v in (model.aliases or {}).items()}, dict(model.tags or {}))


# ---- the registry -------------------------------------------------------------------------------------------

class Registry:
    """Promotion state of one registered model, read from MLflow on every call (no cached state)."""

    def __init__(self, tracking_uri: str, model_name: str, registry_uri: str | None = None) -> None:
        if not tracking_uri:
            raise RegistryError("tracking_uri is empty")
        if not model_name or not _SAFE_FILTER_VALUE.fullmatch(model_name):
            raise RegistryError(f"model_name {model_name!r} must be 1-250 characters without quotes")
        self.tracking_uri = tracking_uri
        # Explicit, so a global MLFLOW_REGISTRY_URI or set_registry_uri() elsewhere in the process is ignored.
        self.registry_uri = registry_uri or tracking_uri
        self.model_name = model_name
        self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.registry_uri)

    # -- reads --

    def version(self, version: str | int) -> VersionInfo:
        return VersionInfo.from_mlflow(self._get_version(parse_version(version)))

    def alias(self, name: str) -> VersionInfo | None:
        state = self._model_state()
        return None if state is None or name not in state.aliases else self.version(state.aliases[name])

    def champion(self) -> VersionInfo | None:
        return self.alias(ALIAS_CHAMPION)

    def audit_trail(self, version: str | int) -> list[dict[str, Any]]:
        return audit_entries(self.version(version).tags)

    def lineage_parents(self) -> dict[str, str | None]:
        """Every version's parent in the lineage tree: the champion it was trained from (None = the student base).

        Read from the version's `parent_version` tag; versions registered before that tag existed fall back to
        their run's `champion_version` tag."""
        out: dict[str, str | None] = {}
        for mv in self._client.search_model_versions(f"name = '{self.model_name}'"):
            tags = dict(mv.tags or {})
            parent = tags.get(TAG_PARENT)
            if parent is None and mv.run_id:
                try:
                    parent = self._client.get_run(mv.run_id).data.tags.get("champion_version")
                except MlflowException:
                    parent = None
            out[str(mv.version)] = parent or None
        return out

    def model_audit_trail(self) -> list[dict[str, Any]]:
        """Alias moves of the registered model (`{"alias", "from", "to"}` in details), oldest first."""
        state = self._model_state()
        return [] if state is None else audit_entries(state.tags)

    # -- pipeline --

    def register_candidate(self, run_id: str, *, tags: dict[str, str], gate_passed: bool, interval_key: str,
                           artifact_path: str = ADAPTER_ARTIFACT, parent_version: str | None = None) -> VersionInfo:
        """Register the run's adapter as a new version; alias `candidate` only when the gate passed.

        `parent_version` is the champion the adapter was trained from (None = the student base): the lineage tree
        the trainer measures a sample's staleness in.

        Idempotent per `interval_key`: when a version carries it already, that version is returned and nothing
        new is created (only an interrupted `candidate` move is completed).
        """
        if not interval_key or not _SAFE_FILTER_VALUE.fullmatch(interval_key):
            raise RegistryError(f"interval_key {interval_key!r} must be 1-250 characters without quotes")
        check_caller_tags(tags)
        self._ensure_model()
        self.reconcile_aliases()
        state = self._model_state() or _ModelState({}, {})
        existing = self._find_by_interval(interval_key)
        if existing is not None:
            if existing.run_id != run_id:
                log.warning("interval %s already registered as version %s from run %s; ignoring run %s",
                            interval_key, existing.version, existing.run_id, run_id)
            return self._complete_candidate(existing, state)

        source = self._adapter_source(run_id, artifact_path)
        all_tags = {**tags, TAG_GATE_PASSED: "true" if gate_passed else "false", TAG_INTERVAL_KEY: interval_key,
                    TAG_PARENT: parent_version or "",
                    audit_key(1): audit_entry("register", PIPELINE_IDENTITY, utc_now(),
                                              {"run_id": run_id, "interval_key": interval_key,
                                               "gate_passed": gate_passed, "source": source})}
        # Tags go in with the create call, so a version never exists without its interval_key.
        mv = self._client.create_model_version(self.model_name, source=source, run_id=run_id, tags=all_tags)
        version = str(mv.version)
        log.info("registered %s version %s from run %s (gate passed: %s)", self.model_name, version, run_id,
                 gate_passed)
        if gate_passed:
            self._move_aliases([(ALIAS_CANDIDATE, version)], actor=PIPELINE_IDENTITY, state=state)
        return self.version(version)

    # -- reviewer --

    def approve(self, version: str | int, reviewer: str) -> VersionInfo:
        """Make a gated version the champion; the old champion becomes `previous`. Idempotent on the champion.

        Any gated version may be approved, not only the current candidate (a reviewer may prefer an older night).
        """
        version = parse_version(version)
        action = f"approve version {version} of {self.model_name}"
        reviewer = check_person(reviewer, action=action, role="reviewer")
        if reviewer.casefold() == PIPELINE_IDENTITY.casefold():
            raise RegistryError(f"{action}: reviewer {reviewer!r} is the pipeline itself; a person must approve")
        target = self.version(version)
        self.reconcile_aliases(noticed_by=reviewer)
        if not target.gate_passed:
            raise RegistryError(f"{action} by {reviewer!r}: it did not pass the gate "
                                f"({TAG_GATE_PASSED}={target.tags.get(TAG_GATE_PASSED)!r}); only gated versions "
                                "can be approved")
        state = self._model_state() or _ModelState({}, {})  # exists: its version was just read
        old = state.aliases.get(ALIAS_CHAMPION)
        if old == version:
            log.info("%s: already champion, nothing to do", action)
            return target

        at = utc_now()
        self._set_tags(target, {TAG_APPROVED_BY: reviewer, TAG_APPROVED_AT: at},
                       audit=("approve", reviewer, at, {"replaced_champion": old}))
        # `previous` first: a crash in between leaves previous == champion, never a champion without fallback.
        moves = [(ALIAS_PREVIOUS, old)] if old is not None else []
        self._move_aliases([*moves, (ALIAS_CHAMPION, version)], actor=reviewer, state=state)
        log.info("%s by %s (previous champion: %s)", action, reviewer, old)
        return self.version(version)

    def rollback(self, actor: str) -> VersionInfo:
        """champion <- previous; previous <- the demoted version (a second rollback undoes the first)."""
        action = f"roll back {self.model_name}"
        actor = check_person(actor, action=action, role="actor")
        self.reconcile_aliases(noticed_by=actor)
        state = self._model_state()
        aliases = state.aliases if state else {}
        if ALIAS_PREVIOUS not in aliases:
            raise RegistryError(f"{action} (asked by {actor!r}): there is no '{ALIAS_PREVIOUS}' version to roll "
                                "back to")
        previous = self.version(aliases[ALIAS_PREVIOUS])
        if aliases.get(ALIAS_CHAMPION) == previous.version:
            raise RegistryError(f"{action} (asked by {actor!r}): '{ALIAS_PREVIOUS}' and '{ALIAS_CHAMPION}' "
                                f"both point at version {previous.version}; nothing to roll back to")
        demoted = self.version(aliases[ALIAS_CHAMPION]) if ALIAS_CHAMPION in aliases else None

        at = utc_now()
        details = {"from": demoted.version if demoted else None, "to": previous.version}
        if demoted is not None:
            self._set_tags(demoted, {TAG_ROLLED_BACK_BY: actor, TAG_ROLLED_BACK_AT: at},
                           audit=("rollback", actor, at, {**details, "role": "demoted"}))
        self._set_tags(previous, {}, audit=("rollback", actor, at, {**details, "role": "restored"}))
        # champion first: serving follows it; a crash in between leaves previous == champion (refused next time).
        self._move_aliases([(ALIAS_CHAMPION, previous.version),
                            (ALIAS_PREVIOUS, demoted.version if demoted else None)], actor=actor, state=state)
        log.info("%s by %s: champion %s -> %s", action, actor, details["from"], details["to"])
        return self.version(previous.version)

    # -- alias moves made outside shadow-distill --

    def reconcile_aliases(self, noticed_by: str = PIPELINE_IDENTITY) -> list[dict[str, Any]]:
        """Audit every alias position the trail does not explain (moved in the MLflow UI); returns those entries.

        Each gets a model entry (actor `UNKNOWN_ACTOR`, `at` = now, the version and its gate tags); a champion
        move also gets a version entry (`approve` when the version passed the gate, `champion_ungated` when not:
        serving refuses it) and moves `previous` to the champion before it, unless `previous` was moved by hand
        too. Idempotent: once written, the positions are explained. A read-only MLflow login (serving's) cannot
        write them: `RegistryError`, and the next writer's call records them.
        """
        state = self._model_state()
        if state is None:
            return []
        moves = unexplained(state.aliases, state.tags)
        entries = []
        try:
            for alias, (old, new) in sorted(moves.items(), key=lambda item: item[0] != ALIAS_CHAMPION):
                entries.append(self._record_outside_move(state, alias, old, new, noticed_by))
            old_champion = moves.get(ALIAS_CHAMPION, (None, None))[0]
            if old_champion is not None and ALIAS_PREVIOUS not in moves \
                    and state.aliases.get(ALIAS_PREVIOUS) != old_champion:
                self._move_aliases([(ALIAS_PREVIOUS, old_champion)], state=state,
                                   actor=f"{noticed_by} (reconcile: the champion before an outside move)")
        except MlflowException as exc:
            raise RegistryError(f"{self.model_name}: alias moved outside shadow-distill ({moves}) noticed by "
                                f"{noticed_by!r} but not recorded: {exc.message}") from exc
        return entries

    def _record_outside_move(self, state: _ModelState, alias: str, old: str | None, new: str | None,
                             noticed_by: str) -> dict[str, Any]:
        at = utc_now()
        target = self.version(new) if new is not None else None
        details = {"alias": alias, "from": old, "to": new, "outside": True, "noticed_by": noticed_by,
                   "gate_passed": target.gate_passed if target else None,
                   "gate": gate_evidence(target.tags) if target else {}, "mlflow": MLFLOW_KNOWS}
        log.warning("%s: alias %r moved outside shadow-distill: %s -> %s (gate passed: %s); recorded by %s",
                    self.model_name, alias, old, new, details["gate_passed"], noticed_by)
        if alias == ALIAS_CHAMPION and target is not None:
            action = "approve" if target.gate_passed else "champion_ungated"
            self._set_tags(target, {}, audit=(action, UNKNOWN_ACTOR, at, {
                "replaced_champion": old, "outside": True, "noticed_by": noticed_by, "gate": details["gate"],
                "mlflow": MLFLOW_KNOWS}))
        key = next_audit_key(state.tags)
        state.tags[key] = audit_entry("alias", UNKNOWN_ACTOR, at, details)
        self._client.set_registered_model_tag(self.model_name, key, state.tags[key])
        return {"action": "alias", "actor": UNKNOWN_ACTOR, "at": at, "details": details}

    # -- serving --

    def download_adapter(self, version: str | int, dst: Path) -> Path:
        """Download a version's adapter folder so that `dst` holds its files; `dst` appears complete or not at all.

        `dst` must not exist or be empty: the files land in a sibling temporary folder first and are renamed into
        place, so a hot-loader watching `dst` never reads a half-downloaded adapter.
        """
        info = self.version(version)
        dst = Path(dst)
        if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
            raise RegistryError(f"download of version {info.version}: destination {dst} exists and is not empty")
        dst.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
        try:
            local = Path(mlflow.artifacts.download_artifacts(
                artifact_uri=info.source, dst_path=str(staging),
                tracking_uri=self.tracking_uri, registry_uri=self.registry_uri))
            if not local.is_dir() or not any(local.iterdir()):
                raise RegistryError(f"version {info.version} source {info.source} holds no adapter folder")
            os.replace(local, dst)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return dst

    # -- MLflow I/O --

    def _get_version(self, version: str) -> ModelVersion:
        try:
            return self._client.get_model_version(self.model_name, version)
        except MlflowException as exc:
            if exc.error_code == _NOT_FOUND:
                raise RegistryError(f"model {self.model_name!r} has no version {version}") from exc
            raise

    def _model_state(self) -> _ModelState | None:
        try:
            return _ModelState.from_mlflow(self._client.get_registered_model(self.model_name))
        except MlflowException as exc:
            if exc.error_code == _NOT_FOUND:
                return None
            raise

    def _ensure_model(self) -> _ModelState:
        state = self._model_state()
        if state is not None:
            return state
        try:
            return _ModelState.from_mlflow(self._client.create_registered_model(
                self.model_name, description="LoRA adapters distilled on-policy by shadow-distill"))
        except MlflowException as exc:  # created concurrently: fine
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self._model_state() or _ModelState({}, {})

    def set_version_tag(self, version: str | int, key: str, value: str) -> None:
        """Record evidence on a version (e.g. the live shadow comparison, `live.*`); reserved and secret-looking
        tags are refused."""
        check_caller_tags({key: value})
        self._client.set_model_version_tag(self.model_name, parse_version(version), key, value)

    def version_of_interval(self, interval_key: str) -> VersionInfo | None:
        """The version a night registered (None: it registered none, e.g. its gate failed)."""
        if not interval_key or not _SAFE_FILTER_VALUE.fullmatch(interval_key):
            raise RegistryError(f"interval_key {interval_key!r} must be 1-250 characters without quotes")
        return self._find_by_interval(interval_key)

    def _find_by_interval(self, interval_key: str) -> VersionInfo | None:
        found = self._client.search_model_versions(
            f"name = '{self.model_name}' and tags.{TAG_INTERVAL_KEY} = '{interval_key}'")
        versions = sorted((VersionInfo.from_mlflow(mv) for mv in found), key=lambda v: int(v.version))
        if len(versions) > 1:
            log.warning("interval %s has %d versions (%s); using the first", interval_key, len(versions),
                        [v.version for v in versions])
        return versions[0] if versions else None

    def _complete_candidate(self, existing: VersionInfo, state: _ModelState) -> VersionInfo:
        """A rerun after a crash between create and alias: move `candidate` unless a newer version holds it."""
        holder = state.aliases.get(ALIAS_CANDIDATE)
        if existing.gate_passed and (holder is None or int(holder) < int(existing.version)):
            self._move_aliases([(ALIAS_CANDIDATE, existing.version)], actor=PIPELINE_IDENTITY, state=state)
            return self.version(existing.version)
        return existing

    def _adapter_source(self, run_id: str, artifact_path: str) -> str:
        try:
            run = self._client.get_run(run_id)
        except MlflowException as exc:
            raise RegistryError(f"cannot register run {run_id!r}: {exc.message}") from exc
        if not self._client.list_artifacts(run_id, artifact_path):
            raise RegistryError(f"run {run_id} has no artifacts under {artifact_path!r}; nothing to register")
        return f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"

    def _set_tags(self, info: VersionInfo, tags: dict[str, str], *, audit: tuple[str, str, str, dict]) -> None:
        """Set `tags` and append one audit entry; `info` was read in this same action."""
        for key, value in {**tags, next_audit_key(info.tags): audit_entry(*audit)}.items():
            self._client.set_model_version_tag(self.model_name, info.version, key, value)

    def _move_aliases(self, moves: list[tuple[str, str | None]], *, actor: str, state: _ModelState) -> None:
        """Point each alias at its version (None deletes it), in order, recording each move on the model.

        `state` was read earlier in the same action; it is updated in place as the moves land.
        """
        for alias, version in moves:
            if version is None:
                self._client.delete_registered_model_alias(self.model_name, alias)
                old = state.aliases.pop(alias, None)
            else:
                self._client.set_registered_model_alias(self.model_name, alias, version)
                old = state.aliases.get(alias)
                state.aliases[alias] = version
            key = next_audit_key(state.tags)
            state.tags[key] = audit_entry("alias", actor, utc_now(), {"alias": alias, "from": old, "to": version})
            self._client.set_registered_model_tag(self.model_name, key, state.tags[key])
