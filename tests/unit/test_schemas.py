"""The trajectory contract: round trip, validation errors, JSON Schema file in sync, migrations match tables."""

import json
from datetime import UTC, datetime

import jsonschema
import pytest

from schemas.arrays import pack_floats, pack_ids, unpack_floats, unpack_ids
from schemas.trajectory import SCHEMA_FILE, SamplingParams, TrajectoryV1, decode_trajectory, json_schema
from foundation.errors import InvalidTrajectory, StoreError, UnknownSchemaVersion


def make(**over) -> TrajectoryV1:
    fields = dict(trajectory_id="t1", request_id="r1", choice_index=0, created_at=datetime(2026, 1, 2, tzinfo=UTC),
                  base_model_id="student", adapter_version="3",
                  sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, seed=7),
                  prompt_token_ids=[1, 2, 3], completion_token_ids=[4, 5], behaviour_logprobs=[-0.5, -1.25],
                  logprob_kind="sampled", finish_reason="stop", prompt_text="hi", completion_text="yo")
    fields.update(over)
    return TrajectoryV1(**fields)


def test_round_trip_is_exact():
    t = make()
    assert decode_trajectory(t.to_bytes()) == t
    assert t.key == b"t1"


def test_the_schema_file_is_generated_from_the_model():
    assert json.loads(SCHEMA_FILE.read_text()) == json_schema()


def test_json_schema_and_model_agree_on_valid_and_invalid_messages():
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(json.loads(make().to_bytes()), schema)
    bad = json.loads(make().to_bytes())
    bad["sampling"]["temperature"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    with pytest.raises(InvalidTrajectory, match="temperature"):
        decode_trajectory(json.dumps(bad))


@pytest.mark.parametrize("raw, match", [
    (b"{not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
])
def test_malformed_messages_are_named(raw, match):
    with pytest.raises(InvalidTrajectory, match=match):
        decode_trajectory(raw)


def test_unknown_schema_version_is_its_own_error():
    obj = json.loads(make().to_bytes())
    obj["schema_version"] = 2
    with pytest.raises(UnknownSchemaVersion):
        decode_trajectory(json.dumps(obj))


def test_logprobs_must_align_with_completion_tokens():
    obj = json.loads(make().to_bytes())
    obj["behaviour_logprobs"] = [-0.5]
    with pytest.raises(InvalidTrajectory, match="1 behaviour logprobs for 2 completion tokens"):
        decode_trajectory(json.dumps(obj))


@pytest.mark.parametrize("field, value", [("behaviour_logprobs", [0.5, -1.0]), ("completion_token_ids", [-1, 2]),
                                          ("created_at", "2026-01-02T00:00:00")])
def test_field_rules(field, value):
    obj = json.loads(make().to_bytes())
    obj[field] = value
    with pytest.raises(InvalidTrajectory):
        decode_trajectory(json.dumps(obj))


def test_array_codec_checks_lengths():
    assert unpack_ids(pack_ids([1, 70000, 3]), 3) == [1, 70000, 3]
    assert unpack_floats(pack_floats([-0.5, -2.0]), 2).tolist() == [-0.5, -2.0]
    with pytest.raises(StoreError, match="stored 3 items, expected 2"):
        unpack_ids(pack_ids([1, 2, 3]), 2)
    with pytest.raises(StoreError, match="whole number"):
        unpack_floats(b"\x00\x00\x00", 1)


def test_migration_creates_exactly_the_declared_tables(tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext
    from sqlalchemy import create_engine

    from schemas.migrate import upgrade
    from schemas.tables import Base

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    with create_engine(url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
