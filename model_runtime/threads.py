"""Torch's CPU thread count, for a block of code: on a shared 2-core host, spinning threads cost 10x.

    with torch_threads(1):
        engine = EmbeddedEngine.from_dir(student_dir, "cpu")
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads, then restore the count there was before."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
