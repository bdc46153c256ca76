"""Compact, length-checked storage of token arrays (little-endian int32 ids, float32 logprobs).

A length mismatch between an array and the count stored beside it is the silent bug this module exists to
make loud: every decode states how many elements it expects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from foundation.errors import StoreError

_INT = np.dtype("<i4")
_FLOAT = np.dtype("<f4")


def pack_ids(ids: Sequence[int]) -> bytes:
    return np.asarray(ids, dtype=_INT).tobytes()


def pack_floats(values: Sequence[float]) -> bytes:
    return np.asarray(values, dtype=_FLOAT).tobytes()


def _unpack(blob: bytes, dtype: np.dtype, expected_len: int, what: str) -> np.ndarray:
    if len(blob) % dtype.itemsize:
        raise StoreError(f"{what}: {len(blob)} bytes is not a whole number of {dtype.itemsize}-byte items")
    arr = np.frombuffer(blob, dtype=dtype)
    if arr.size != expected_len:
        raise StoreError(f"{what}: stored {arr.size} items, expected {expected_len}")
    return arr


def unpack_ids(blob: bytes, expected_len: int, what: str = "token ids") -> list[int]:
    return _unpack(blob, _INT, expected_len, what).tolist()


def unpack_floats(blob: bytes, expected_len: int, what: str = "logprobs") -> np.ndarray:
    return _unpack(blob, _FLOAT, expected_len, what).astype(np.float32)
