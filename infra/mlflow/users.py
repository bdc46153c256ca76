"""MLflow's users and grants for shadow-distill, created or brought up to date (idempotent: run it again after
any change). Runs as the MLflow admin against a server started with `--app-name basic-auth` (serve.sh).

Who may do what. MLflow grants are per experiment and per registered model, not per alias, so "may move an
alias" means EDIT on the registered model:

| user      | nightly experiment | registered model | so that it can                                            |
|-----------|--------------------|------------------|-----------------------------------------------------------|
| pipeline  | EDIT               | EDIT             | log the night's run, register versions, set tags, move `candidate` |
| reviewers | READ               | EDIT             | read the review page, approve (move `champion`/`previous`, tag the version) |
| serving   | READ               | READ             | resolve `champion` and download its adapter               |
| others    | -                  | -                | nothing (default_permission = NO_PERMISSIONS)             |

EDIT on the registered model lets the pipeline's credential move `champion` too (MLflow has no per-alias grant):
only Airflow holds that credential, and serving only loads a champion whose version carries the gate's passed
tag. Removing a reviewer is `AuthServiceClient(uri).delete_user(NAME)` (or revoke their grant); this script never
deletes a user.

Environment: MLFLOW_TRACKING_URI, and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD of the admin (MLflow's
own client settings); MLFLOW_PIPELINE_USERNAME / _PASSWORD and MLFLOW_SERVING_USERNAME / _PASSWORD (the same
values the pipeline and serving log in with, so a rerun after a change rotates them). Reviewers come from a
JSON file {"alice": "initial password", ...}: a new reviewer gets that password, an existing one keeps theirs
(they change it with the update-password API).

    python infra/mlflow/users.py --model-name NAME --experiment shadow-distill-nightly \
        --reviewers-file /run/secrets/mlflow_reviewers
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PIPELINE_GRANTS = {"experiment": "EDIT", "registered_model": "EDIT"}
REVIEWER_GRANTS = {"experiment": "READ", "registered_model": "EDIT"}
SERVING_GRANTS = {"experiment": "READ", "registered_model": "READ"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="the MLflow server (default: $MLFLOW_TRACKING_URI)")
    p.add_argument("--model-name", required=True, help="the registered model (REGISTERED_MODEL_NAME)")
    p.add_argument("--experiment", default="shadow-distill-nightly",
                   help="the nightly runs' experiment (the nightly config's `experiment`)")
    p.add_argument("--reviewers-file", type=Path, required=True,
                   help='JSON {"name": "initial password", ...}: who may move champion/previous')
    return p


def _env(name: str) -> str:
    value = os.environ.get(name, "")
    if not value:
        sys.exit(f"{name} is not set")
    return value


def load_reviewers(path: Path) -> dict[str, str]:
    reviewers = json.loads(path.read_text())
    if not isinstance(reviewers, dict) or not reviewers:
        sys.exit(f"{path}: expected a non-empty JSON object of reviewer name -> initial password")
    for name, password in reviewers.items():
        if not name or not isinstance(password, str) or not password:
            sys.exit(f"{path}: reviewer {name!r} needs a non-empty password")
    return reviewers


def plan(args: argparse.Namespace) -> list[tuple[str, str, dict[str, str]]]:
    """(username, password, grants) for every user this job manages."""
    users = [(_env("MLFLOW_PIPELINE_USERNAME"), _env("MLFLOW_PIPELINE_PASSWORD"), PIPELINE_GRANTS),
             (_env("MLFLOW_SERVING_USERNAME"), _env("MLFLOW_SERVING_PASSWORD"), SERVING_GRANTS)]
    reserved = {u for u, _, _ in users} | {os.environ.get("MLFLOW_TRACKING_USERNAME", "")}
    for name, password in load_reviewers(args.reviewers_file).items():
        if name in reserved:
            sys.exit(f"reviewer {name!r} is also the admin, the pipeline or the serving user: a person must review")
        users.append((name, password, REVIEWER_GRANTS))
    return users


def ensure_resources(tracking_uri: str, model_name: str, experiment: str) -> dict[str, str]:
    """The experiment and the registered model exist (created by the admin if not); their grant ids."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    experiment_id = exp.experiment_id if exp else client.create_experiment(experiment)
    try:
        client.get_registered_model(model_name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(model_name, description="LoRA adapters distilled on-policy by shadow-distill")
    return {"experiment": experiment_id, "registered_model": model_name}


def ensure_user(auth, username: str, password: str, *, keep_password: bool) -> str:
    """Create the user with `password`, or reset an existing user's password unless `keep_password`."""
    from mlflow.exceptions import MlflowException

    try:
        auth.get_user(username)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        auth.create_user(username, password)
        return "created"
    if keep_password:
        return "kept"
    auth.update_user_password(username, password)
    return "password set"


def ensure_grant(auth, username: str, resource_type: str, resource_id: str, permission: str) -> None:
    """The user holds exactly `permission` on the resource (a different earlier grant is replaced)."""
    from mlflow.exceptions import MlflowException

    try:
        auth.grant_user_permission(username, resource_type, resource_id, permission)
        return
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if auth.get_user_permission(username, resource_type, resource_id).permission != permission:
        auth.revoke_user_permission(username, resource_type, resource_id)
        auth.grant_user_permission(username, resource_type, resource_id, permission)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if not args.tracking_uri:
        sys.exit("--tracking-uri or MLFLOW_TRACKING_URI is required")
    from mlflow.server.auth.client import AuthServiceClient

    users = plan(args)
    resources = ensure_resources(args.tracking_uri, args.model_name, args.experiment)
    auth = AuthServiceClient(args.tracking_uri)
    for username, password, grants in users:
        # An existing reviewer keeps the password they chose; the machine users follow the environment.
        outcome = ensure_user(auth, username, password, keep_password=grants is REVIEWER_GRANTS)
        for resource_type, permission in grants.items():
            ensure_grant(auth, username, resource_type, resources[resource_type], permission)
        print(json.dumps({"user": username, "account": outcome, "grants": grants}))


if __name__ == "__main__":
    main()
