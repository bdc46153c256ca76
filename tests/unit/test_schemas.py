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


def test_a_message_written_before_the_optional_sampling_fields_parses_unchanged():
    old = json.loads(make().to_bytes())  # what serving wrote before min_p, min_tokens, ignore_eos, user_hash
    assert decode_trajectory(json.dumps(old)).sampling.is_untruncated_temperature_one


def test_neutral_optional_fields_are_left_out_of_the_message():
    assert set(json.loads(make().to_bytes())["sampling"]) == {"temperature", "top_p", "top_k", "max_tokens", "seed"}


def test_no_user_hash_is_left_out_of_the_message():
    assert "user_hash" not in json.loads(make().to_bytes())


@pytest.mark.parametrize("extra", [{"min_p": 0.05}, {"min_tokens": 3}, {"ignore_eos": True}])
def test_a_distribution_changing_extra_is_kept_and_is_not_rule_one(extra):
    t = make(sampling=SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=16, **extra))
    assert decode_trajectory(t.to_bytes()).sampling.is_untruncated_temperature_one is False


def test_user_hash_round_trips():
    assert decode_trajectory(make(user_hash="ab" * 32).to_bytes()).user_hash == "ab" * 32


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


def test_prompt_hash_is_sha256_of_the_packed_ids():
    import hashlib

    from schemas.prompts import prompt_hash

    assert prompt_hash([1, 70000, 3]) == hashlib.sha256(pack_ids([1, 70000, 3])).hexdigest()


def test_prompt_hash_tells_prompts_apart():
    from schemas.prompts import prompt_hash

    assert prompt_hash([1, 2]) != prompt_hash([2, 1])


def test_migration_0004_fills_the_prompt_hash_of_rows_stored_before_it(tmp_path):
    import sqlalchemy as sa

    from schemas.migrate import upgrade
    from schemas.prompts import prompt_hash

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url, "0003")
    engine = sa.create_engine(url)
    row = {"trajectory_id": "old", "request_id": "r", "choice_index": 0, "created_at": datetime(2026, 1, 1),
           "ingested_at": datetime(2026, 1, 1), "base_model_id": "s", "temperature": 1.0, "top_p": 1.0,
           "top_k": 0, "max_tokens": 4, "logprob_kind": "sampled", "finish_reason": "stop", "n_prompt_tokens": 3,
           "n_completion_tokens": 0, "prompt_token_ids": pack_ids([5, 6, 7]), "completion_token_ids": b"",
           "behaviour_logprobs": b"", "schema_version": 1}
    with engine.begin() as c:
        c.execute(sa.table("trajectories", *[sa.column(k) for k in row]).insert().values(row))
    upgrade(url)
    with engine.connect() as c:
        stored = c.execute(sa.text("SELECT prompt_hash FROM trajectories")).scalar_one()
    engine.dispose()
    assert stored == prompt_hash([5, 6, 7])
