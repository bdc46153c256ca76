"""Helpers for serving's tests, contract test and bench: real LoRA adapters that visibly change the output,
torch threads for a shared host, and waiting for trajectories that are logged just after a response.

    make_adapter(student_dir, adapters_root / "v1", seed=1, rank=4)   # saved with model_runtime.adapters
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from model_runtime.adapters import save_adapter
from model_runtime.models import ModelMeta, load_model


def make_adapter(student_dir: Path, out: Path, seed: int, rank: int = 4, scale: float = 0.5) -> Path:
    """A LoRA adapter (q/v projections) with random A and B, so that it moves the logits of the student."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(student_dir, "cpu", torch.float32),
                           LoraConfig(r=rank, lora_alpha=rank, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)
    return save_adapter(model, Path(out), ModelMeta.read(student_dir).model_id)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with `n` torch threads, then restore: on a shared 2-core host, spinning threads cost 10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def wait_logged(sink, where: Callable[[Any], bool], n: int = 1, timeout_s: float = 5.0) -> list:
    """Trajectories in a `MemorySink` for which `where(traj)` holds, once at least `n` are there.

    Serving submits trajectories just after a response is sent, so a client that has its answer may look
    a moment too early; this waits (and returns what there is after `timeout_s`).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        found = [t for t in list(sink.items) if where(t)]
        if len(found) >= n or time.monotonic() > deadline:
            return found
        time.sleep(0.02)


@contextlib.contextmanager
def embedded_server(config, *, admin_token: str, adapters_root: Path | None = None) -> Iterator[Any]:
    """A live embedded server on 127.0.0.1 (one torch thread, MemorySink) with `.engine`, `.sink`, `.root` set."""
    from serving.api_server import BackgroundServer, build_app
    from serving.engine import EmbeddedEngine
    from serving.trajectories import MemorySink

    with torch_threads(1):
        engine = EmbeddedEngine.from_dir(config.model_dir, "cpu", max_batch_size=8, batch_wait_ms=2)
        sink = MemorySink()
        try:
            with BackgroundServer(build_app(config, engine, sink=sink, admin_token=admin_token,
                                            caller_salt="s")) as srv:
                srv.engine, srv.sink, srv.root = engine, sink, adapters_root
                yield srv
        finally:
            engine.close()
