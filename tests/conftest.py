"""Fixtures shared by every tier: tiny models (built offline), a real Tansu broker, SQLite and PostgreSQL stores."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PG_ADMIN_URL = os.environ.get("SHADOW_DISTILL_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[Path, Path]:
    """(teacher_dir, student_dir): a 4-layer random Llama and the same with layer 2 dropped."""
    from model_runtime.tiny import build_tiny_pair

    return build_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def kafka_broker():
    """A real Kafka-protocol broker (Tansu) for the whole session."""
    from message_bus.broker import TansuBroker

    with TansuBroker() as broker:
        yield broker


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'store.db'}"


def _pg_available() -> bool:
    try:
        import sqlalchemy as sa

        with sa.create_engine(PG_ADMIN_URL).connect():
            return True
    except Exception:
        return False


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database per test, dropped afterwards. Skips only where no server listens."""
    import sqlalchemy as sa

    if not _pg_available():
        pytest.skip(f"no PostgreSQL at {PG_ADMIN_URL}")
    name = f"sd_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as c:
        c.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path) -> str:
    """Runs a store test against both backends."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    return request.getfixturevalue("pg_url")
