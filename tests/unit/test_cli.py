"""The CLI: flags map onto validated configs, user errors are one line naming the bad value (exit 2)."""

import json
import sys
from datetime import UTC, datetime, timedelta

import pytest

from shadow_distill.cli import _when, build_parser, main
from shadow_distill.stack import Supervisor


def test_relative_and_absolute_times():
    assert abs(_when("2d") - (datetime.now(UTC) - timedelta(days=2))).total_seconds() < 5
    assert _when("2026-11-24T02:00Z") == datetime(2026, 11, 24, 2, tzinfo=UTC)
    assert _when("2026-11-24").tzinfo is not None


@pytest.mark.parametrize("argv, message", [
    (["store", "purge", "--url", "sqlite:///x.db", "--older-than", "soon"], "'soon' is neither an ISO"),
    (["promote", "--version", "1", "--reviewer", "bob"], "promote needs --tracking-uri"),
    (["models", "prepare", "--drop-layers", "a,b"], "--drop-layers 'a,b'"),
    (["serve", "--model-dir", "/m", "--port", "70000"], "--port"),
])
def test_user_errors_are_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SHADOW_DISTILL_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)  # relative sqlite URLs land in the test's folder, never in the checkout
    monkeypatch.delenv("SHADOW_DISTILL_MLFLOW_URI", raising=False)
    if argv[0] == "models":  # an explicit layer list is parsed before any model is loaded
        from shadow_distill.models_setup import prepare_layers
        from foundation.errors import ConfigError

        with pytest.raises(ConfigError, match="--drop-layers 'a,b'"):
            prepare_layers(tmp_path, "a,b", 2)
        return
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_every_config_field_is_a_flag():
    from serving.config import ServingConfig
    from shadow_scoring.config import ScoringConfig

    parser = build_parser()
    serve = parser.parse_args(["serve", "--model-dir", "/m", "--no-log-texts", "--max-batch-size", "4"])
    assert serve.log_texts is False
    assert serve.max_batch_size == "4"
    for name in ServingConfig.model_fields:
        assert hasattr(serve, name)
    score = parser.parse_args(["score", "run", "--bootstrap-servers", "h:1", "--store-url", "sqlite://", "--teacher", "t"])
    for name in ScoringConfig.model_fields:
        assert hasattr(score, name)


def test_models_tiny_writes_a_teacher_and_student(tmp_path, capsys):
    assert main(["models", "tiny", "--out", str(tmp_path / "m")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (tmp_path / "m" / "student" / "shadow_distill.json").exists()
    assert out["teacher"].endswith("teacher")


def test_supervisor_stops_exactly_what_it_started(tmp_path):
    import subprocess

    sup = Supervisor(tmp_path / "stack")
    rec = sup.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert sup.alive(rec)
        assert list(sup.records()) == ["sleeper"]
        sup.stop_all()
        assert not sup.alive(rec)
        assert sup.records() == {}
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_service_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    from foundation.errors import ShadowDistillError

    sup = Supervisor(tmp_path / "stack")
    with pytest.raises(ShadowDistillError, match="boom"):
        sup.start("broken", [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], port=1)
    assert sup.records() == {}
