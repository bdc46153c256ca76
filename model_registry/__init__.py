"""The MLflow model registry of distilled adapters: register a gated candidate, approve, roll back, download.

Written by the nightly DAG (`register_candidate`), driven by reviewers (`approve`, `rollback`, or aliases moved in
the MLflow UI), read by serving (`champion`, `download_adapter`). See `registry.py`.
"""

from model_registry.registry import (
    ADAPTER_ARTIFACT,
    ALIAS_CANDIDATE,
    ALIAS_CHAMPION,
    ALIAS_PREVIOUS,
    PIPELINE_IDENTITY,
    Registry,
    VersionInfo,
)

__all__ = [
    "ADAPTER_ARTIFACT",
    "ALIAS_CANDIDATE",
    "ALIAS_CHAMPION",
    "ALIAS_PREVIOUS",
    "PIPELINE_IDENTITY",
    "Registry",
    "VersionInfo",
]
