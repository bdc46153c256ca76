"""`shadow-distill`: one console script for every part. Each subcommand is a thin call into its part.

    shadow-distill demo                                   # the whole loop once, on this machine
    shadow-distill models prepare                         # teacher + layer-dropped student, offline
    shadow-distill serve --model-dir DIR --kafka-bootstrap HOST:PORT ...
    shadow-distill score run --bootstrap-servers HOST:PORT --store-url URL --teacher DIR
    shadow-distill score backfill --store-url URL --teacher DIR --since 2026-11-01
    shadow-distill store migrate --url URL | store purge --url URL --older-than 30d
    shadow-distill store forget --url URL --caller-hash H --actor NAME [--config nightly.json]
    shadow-distill nightly run --config nightly.json [--start ISO --end ISO]
    shadow-distill nightly review --config nightly.json --start ISO --end ISO     # rebuild the review page
    shadow-distill promote approve --version N --reviewer NAME   (or: promote --version N --reviewer NAME)
    shadow-distill promote rollback --actor NAME | promote status      # status: each alias with its gate evidence
    shadow-distill stack up | down | status

Errors a user can fix (bad flag values, refused promotions, missing models) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from foundation.errors import ConfigError, ShadowDistillError


def _when(text: str) -> datetime:
    """ISO date/time (UTC if no zone) or a relative age like 30d / 12h."""
    m = re.fullmatch(r"(\d+)([dhm])", text.strip())
    if m:
        unit = {"d": "days", "h": "hours", "m": "minutes"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise ConfigError(f"{text!r} is neither an ISO date/time nor an age like 30d or 12h") from exc
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# ---- models ------------------------------------------------------------------------------------------------
def cmd_models(args: argparse.Namespace) -> None:
    from model_runtime import models

    models_dir = Path(args.models_dir) if args.models_dir else models.default_models_dir()
    if args.action == "tiny":
        from model_runtime.tiny import build_tiny_pair

        print(json.dumps({k: str(v) for k, v in zip(("teacher", "student"), build_tiny_pair(Path(args.out)))}))
        return
    teacher_dir = models.ensure_teacher(models_dir)
    from shadow_distill.models_setup import prepare_layers

    layers = prepare_layers(teacher_dir, args.drop_layers, args.n_drop, verbose=args.action == "sensitivity")
    if args.action == "prepare":
        student_dir = models.build_student(teacher_dir, layers)
        print(json.dumps({"teacher": str(teacher_dir), "student": str(student_dir), "dropped_layers": layers}))


# ---- services ----------------------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> None:
    from serving.api_server import run_server
    from serving.config import ServingConfig
    from foundation.flags import model_from_args

    run_server(model_from_args(ServingConfig, args))


def cmd_score(args: argparse.Namespace) -> None:
    from foundation.flags import model_from_args
    from shadow_scoring.config import ScoringConfig

    if args.action == "run":
        from shadow_scoring.consumer import ScoringService

        with ScoringService.from_config(model_from_args(ScoringConfig, args)) as service:
            print(json.dumps(service.run()))
    else:
        from feature_store import FeatureStore
        from shadow_scoring.consumer import backfill
        from shadow_scoring.teacher import build_teacher

        cfg = model_from_args(ScoringConfig, args)
        report = backfill(FeatureStore.open(cfg.store_url), build_teacher(cfg), _when(args.since) if args.since else None,
                          _when(args.until) if args.until else None, cfg.batch_tokens, topk=cfg.topk)
        print(json.dumps({"teacher_id": report.teacher_id, "seen": report.seen, "rows_written": report.rows_written,
                          "rejected": len(report.rejected_ids)}))


def cmd_store(args: argparse.Namespace) -> None:
    from feature_store import FeatureStore

    store = FeatureStore.open(args.url)  # migrates to head
    if args.action == "purge":
        print(json.dumps({"purged": store.purge(_when(args.older_than))}))
    elif args.action == "forget":
        print(json.dumps(forget(store, args), indent=1))
    else:
        print(json.dumps({"migrated": args.url.split("@")[-1]}))


def forget(store, args: argparse.Namespace) -> dict:
    """Erase one caller (or end user) everywhere: the store's rows, every frozen manifest, the review pages of the
    nights that showed them (with --config); serving's POST /v1/admin/forget gives the hash and stops logging."""
    from dataclasses import asdict

    if bool(args.caller_hash) == bool(args.user_hash):
        raise ConfigError("store forget needs exactly one of --caller-hash H or --user-hash H (serving's POST "
                          "/v1/admin/forget answers with it)")
    if not args.actor:
        raise ConfigError("store forget needs --actor NAME: who asked for the erasure (it is recorded)")
    subject, digest = ("caller", args.caller_hash) if args.caller_hash else ("user", args.user_hash)
    report = asdict(store.forget(subject, digest, actor=args.actor))
    if args.config:
        from nightly_train.config import NightlyConfig
        from nightly_train.retention import purge_review_pages

        cfg = NightlyConfig.from_json_file(args.config)
        report["review_pages_purged"] = purge_review_pages(cfg, intervals=report["heldout_nights"],
                                                           reason=f"erasure of a {subject} by {args.actor}")
    elif report["heldout_nights"]:
        report["warning"] = "pass --config nightly.json to purge the review pages of " + ", ".join(
            report["heldout_nights"])
    return report


def _night(args: argparse.Namespace):
    from nightly_train.config import NightlyConfig
    from nightly_train.pipeline import Night

    end = _when(args.end) if args.end else datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    start = _when(args.start) if args.start else end - timedelta(days=1)
    return Night(NightlyConfig.from_json_file(args.config), start, end)


def cmd_nightly(args: argparse.Namespace) -> None:
    from nightly_train import pipeline

    night = _night(args)
    if args.action == "run":
        print(json.dumps(pipeline.run_night(night), indent=1, default=str))
        return
    # review: rebuild the night's page from its evaluation and gate tags (e.g. after changing the page's code)
    from nightly_train.results import Evaluation, GateOutcome

    files = night.layout.evaluation_files()
    if not files:
        raise ConfigError(f"interval {night.key} has no evaluation under {night.layout.root}: run the night first")
    evaluation = Evaluation.read(files[-1])
    tags = night.mlflow().get_run(evaluation.run_id).data.tags
    outcome = GateOutcome(interval_key=night.key, run_id=evaluation.run_id, passed=tags.get("gate.passed") == "true",
                          tags={k: v for k, v in tags.items() if k.startswith("gate.")}, table="")
    print(pipeline.review(night, evaluation, outcome) / "index.html")


def _registry(args: argparse.Namespace):
    from model_registry.registry import Registry

    uri, name = args.tracking_uri, args.model_name
    if args.config:
        from nightly_train.config import NightlyConfig

        cfg = NightlyConfig.from_json_file(args.config)
        uri, name = uri or cfg.mlflow_tracking_uri, name or cfg.registered_model()
    if not uri or not name:
        raise ConfigError("promote needs --tracking-uri and --model-name (or --config nightly.json, or the env vars "
                          "SHADOW_DISTILL_MLFLOW_URI / SHADOW_DISTILL_MODEL_NAME)")
    return Registry(uri, name)


def cmd_promote(args: argparse.Namespace) -> None:
    from shadow_distill import promotion

    reg = _registry(args)
    action = args.action or ("approve" if args.version else "status")
    cfg = _nightly(args)
    if action == "approve":
        if not args.version or not args.reviewer:
            raise ConfigError("promote approve needs --version N and --reviewer NAME")
        live = promotion.live_evidence(cfg, reg, str(args.version), args.serving_url) if cfg else None
        minimum = args.min_live_pairs if args.min_live_pairs is not None else (cfg.min_live_pairs if cfg else 0)
        promotion.require_live_pairs(live, minimum, str(args.version))
        if live:
            print(json.dumps({"live": live}, indent=1))
        info = reg.approve(args.version, args.reviewer)
        print(f"version {info.version} is now champion (approved by {args.reviewer})")
    elif action == "rollback":
        info = reg.rollback(args.actor or args.reviewer or os.environ.get("USER", ""))
        print(f"rolled back: version {info.version} is champion again")
    else:
        print(json.dumps(promotion.promote_status(reg, cfg, args.serving_url), indent=1))


def _nightly(args: argparse.Namespace):
    if not args.config:
        return None
    from nightly_train.config import NightlyConfig

    return NightlyConfig.from_json_file(args.config)


def cmd_stack(args: argparse.Namespace) -> None:
    from shadow_distill import stack

    getattr(stack, f"cmd_{args.action}")(args)


def cmd_demo(args: argparse.Namespace) -> None:
    from shadow_distill.demo import DemoConfig, run_demo

    from foundation.flags import model_from_args

    run_demo(model_from_args(DemoConfig, args))


# ---- parser ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from foundation.flags import add_model_flags

    p = argparse.ArgumentParser(prog="shadow-distill", description=__doc__.split("\n\n")[0])
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("models", help="prepare the teacher and the student offline")
    m.add_argument("action", choices=["prepare", "sensitivity", "tiny"])
    m.add_argument("--models-dir", default=None)
    m.add_argument("--drop-layers", default="auto", help="'auto' (sensitivity check) or e.g. 17,18")
    m.add_argument("--n-drop", type=int, default=2)
    m.add_argument("--out", default="tiny-models", help="tiny: output folder")
    m.set_defaults(func=cmd_models)

    from serving.config import ServingConfig
    from shadow_scoring.config import ScoringConfig

    s = sub.add_parser("serve", help="the OpenAI-compatible student endpoint")
    add_model_flags(s, ServingConfig)
    s.set_defaults(func=cmd_serve)

    sc = sub.add_parser("score", help="teacher scoring service / backfill")
    sc.add_argument("action", choices=["run", "backfill"])
    sc.add_argument("--since", default=None)
    sc.add_argument("--until", default=None)
    add_model_flags(sc, ScoringConfig)
    sc.set_defaults(func=cmd_score)

    st = sub.add_parser("store", help="feature store maintenance; forget = erase one caller's data")
    st.add_argument("action", choices=["migrate", "purge", "forget"])
    st.add_argument("--url", required=True)
    st.add_argument("--older-than", default="30d")
    st.add_argument("--caller-hash", default=None, help="forget: the caller's hash (serving's /v1/admin/forget)")
    st.add_argument("--user-hash", default=None, help="forget: one end user's hash instead")
    st.add_argument("--actor", default=None, help="forget: who asked for the erasure (recorded)")
    st.add_argument("--config", default=None, help="forget: nightly.json, to purge the nights' review pages too")
    st.set_defaults(func=cmd_store)

    n = sub.add_parser("nightly", help="one nightly run without Airflow, or rebuild a night's review page")
    n.add_argument("action", choices=["run", "review"])
    n.add_argument("--config", required=True)
    n.add_argument("--start", default=None)
    n.add_argument("--end", default=None)
    n.set_defaults(func=cmd_nightly)

    pr = sub.add_parser("promote", help="reviewer approval, rollback and status in the MLflow registry")
    pr.add_argument("action", nargs="?", choices=["approve", "rollback", "status"])
    pr.add_argument("--version")
    pr.add_argument("--reviewer")
    pr.add_argument("--actor")
    pr.add_argument("--config", default=None, help="nightly.json (tracking URI, model name, and the store the live "
                                                   "shadow comparison is read from)")
    pr.add_argument("--serving-url", default=None, help="serving, for the shadow candidate's latency (admin token "
                                                        "from $SHADOW_DISTILL_ADMIN_TOKEN)")
    pr.add_argument("--min-live-pairs", type=int, default=None, help="approve: refuse a candidate with fewer live "
                                                                     "shadow pairs (default: the nightly file's)")
    pr.add_argument("--tracking-uri", default=os.environ.get("SHADOW_DISTILL_MLFLOW_URI"))
    pr.add_argument("--model-name", default=os.environ.get("SHADOW_DISTILL_MODEL_NAME"))
    pr.set_defaults(func=cmd_promote)

    sk = sub.add_parser("stack", help="local stack: broker, MLflow, Airflow, serving, scorer")
    sk.add_argument("action", choices=["up", "down", "status"])
    sk.add_argument("--dir", default=".stack")
    sk.add_argument("--tiny", action="store_true", help="use tiny random models (smoke test)")
    sk.set_defaults(func=cmd_stack)

    from shadow_distill.demo import DemoConfig

    d = sub.add_parser("demo", help="run the whole shadow loop once, end to end")
    add_model_flags(d, DemoConfig)
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except ShadowDistillError as exc:
        print(f"shadow-distill {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
