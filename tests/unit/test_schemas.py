"""The trajectory contract (v1 and v2): round trip, validation errors, JSON Schema files in sync, migrations."""

import json
from datetime import UTC, datetime

import jsonschema
import pytest

from schemas.arrays import pack_floats, pack_ids, unpack_floats, unpack_ids
from schemas.trajectory import (SCHEMA_FILE, SCHEMA_FILES, SamplingParams, TrajectoryV1, TrajectoryV2,
                               decode_trajectory, json_schema)
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
    obj["schema_version"] = 3
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


def make_v2(**over) -> TrajectoryV2:
    fields = make().model_dump(exclude={"schema_version", "prompt_text", "completion_text"})
    fields.update(prompt_kind="chat", messages=[{"role": "user", "content": "hi"}], prompt_text="<u>hi</u>",
                  completion_text="yo", completion_offsets=[1, 2])
    fields.update(over)
    return TrajectoryV2(**fields)


def test_v2_round_trip_is_exact():
    t = make_v2()
    assert decode_trajectory(t.to_bytes()) == t


def test_v1_and_v2_decode_to_their_own_versions():
    assert [type(decode_trajectory(m.to_bytes())) for m in (make(), make_v2())] == [TrajectoryV1, TrajectoryV2]


def test_the_v2_schema_file_is_generated_from_the_model():
    assert json.loads(SCHEMA_FILES[2].read_text()) == json_schema(2)


def test_the_v2_json_schema_accepts_a_v2_message():
    jsonschema.validate(json.loads(make_v2().to_bytes()), json.loads(SCHEMA_FILES[2].read_text()))


def test_the_v2_json_schema_refuses_offsets_that_are_not_integers():
    bad = json.loads(make_v2().to_bytes())
    bad["completion_offsets"] = ["1", 2]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, json.loads(SCHEMA_FILES[2].read_text()))


def test_the_v1_json_schema_refuses_a_v2_message():
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(json.loads(make_v2().to_bytes()), json.loads(SCHEMA_FILE.read_text()))


def test_v2_default_template_switches_are_left_out_of_the_message():
    assert {"add_generation_prompt", "continue_final_message"} & set(json.loads(make_v2().to_bytes())) == set()


def test_a_text_prompt_without_texts_is_a_valid_v2_message():
    t = make_v2(prompt_kind="text", messages=None, prompt_text=None, completion_text=None, completion_offsets=None)
    assert decode_trajectory(t.to_bytes()).prompt_kind == "text"


@pytest.mark.parametrize("over, match", [
    ({"completion_offsets": [1]}, "1 offsets for 2 completion tokens"),
    ({"completion_offsets": [2, 1]}, "completion_offsets.1"),
    ({"completion_offsets": [1, 3]}, "completion_offsets.1"),
    ({"completion_offsets": [1, 1]}, "last offset 1 is not the text's length 2"),
    ({"completion_text": None}, "offsets without completion_text"),
    ({"prompt_kind": "text"}, "a `text` prompt has no messages"),
    ({"prompt_kind": "text", "messages": None, "continue_final_message": True}, "only a `chat` prompt"),
    ({"prompt_kind": "json"}, "prompt_kind"),
])
def test_v2_field_rules_are_named(over, match):
    obj = json.loads(make_v2().to_bytes())
    obj.update(over)
    with pytest.raises(InvalidTrajectory, match=match):
        decode_trajectory(json.dumps(obj))


def test_v2_error_names_the_version():
    obj = json.loads(make_v2().to_bytes())
    del obj["prompt_kind"]
    with pytest.raises(InvalidTrajectory, match="v2 prompt_kind"):
        decode_trajectory(json.dumps(obj))


def test_a_v2_offset_repeats_where_a_token_ends_inside_a_character():
    t = make_v2(completion_token_ids=[4, 5, 6], behaviour_logprobs=[-0.1, -0.2, -0.3], completion_text="a\u00e9",
                completion_offsets=[1, 1, 2])
    assert decode_trajectory(t.to_bytes()).completion_offsets == [1, 1, 2]


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
