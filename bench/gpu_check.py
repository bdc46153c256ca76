"""The GPU path, measured in one short run (under 8 minutes on one GPU): one line per check.

1. `bf16_step`: the trainer's first step on CUDA in bf16 against the same step on the CPU in fp32, same tiny
   models, same batch (logged rule-1 and rule-2 rows): the loss within 2% and the LoRA gradient's cosine
   similarity above 0.99 (bf16 keeps ~3 significant digits; the trainer upcasts logits before log_softmax).
2. `train_throughput`, `scoring_efficiency`, `serving_overhead`: the three benches on CUDA, each with its own last
   line (its ratio), and the peak GPU memory used while it ran (nvidia-smi polled every 0.2 s; with no
   nvidia-smi, torch's peak of this process is reported instead and the benches' memory is "n/a").

    bash scripts/gpu-check.sh               # on the GPU machine (installs the carried wheels first)
    .venv/bin/python bench/gpu_check.py --device cpu --quick     # a dry run of the same code on the CPU

With `--device cpu` the first check compares bf16 on the CPU with fp32 (the code path, not the GPU's numbers).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))


def line(name: str, passed: bool | None, detail: str) -> None:
    verdict = "INFO" if passed is None else ("PASS" if passed else "FAIL")
    print(f"CHECK {name}: {verdict} {detail}", flush=True)


def first_step(device: str, dtype: torch.dtype, teacher_dir: Path, student_dir: Path, work: Path):
    """(loss, flattened LoRA gradient) of the trainer's first micro-batch on `device` in `dtype`."""
    import numpy as np

    from model_runtime.logprobs import completion_logprobs
    from model_runtime.models import load_model, load_tokenizer
    from model_runtime.sampling import DecodeParams, sample
    from nightly_train.config import TrainConfig
    from nightly_train.data import Example
    from nightly_train.train import Distiller

    tok, student, teacher = load_tokenizer(student_dir), load_model(student_dir), load_model(teacher_dir)
    prompts = [tok(t).input_ids for t in ("hello there", "write a poem", "list two colors", "how are you")]
    res = sample(student, prompts, [DecodeParams(max_tokens=12, seed=i) for i in range(4)], eos_ids=set(),
                 pad_id=tok.pad_token_id)
    scored = completion_logprobs(teacher, prompts, [r.completion_ids for r in res], tok.pad_token_id, topk=8)
    examples = [Example(f"g{i}", "sampled_is" if i % 2 == 0 else "topk_analytic", p, r.completion_ids,
                        np.asarray(r.sampled_logprobs, np.float32), s.logprobs_C.numpy(), s.topk_ids_CK.numpy(),
                        s.topk_logprobs_CK.numpy(), 0) for i, (p, r, s) in enumerate(zip(prompts, res, scored))]
    cfg = TrainConfig(student_dir=student_dir, teacher_id="t", output_dir=work / device, batch_size=4, max_steps=1,
                      lora={"rank": 4, "alpha": 8}, seed=0, device=device.split(":")[0])
    distiller = Distiller(cfg, examples)
    distiller.dtype = dtype
    distiller.model.to(dtype=dtype)
    distiller.model.train()
    loss, _, _ = distiller.micro_step(0, 0)
    grads = torch.cat([p.grad.float().flatten().cpu() for p in distiller.model.parameters() if p.grad is not None])
    return loss, grads


def check_bf16(device: str, work: Path) -> bool:
    from model_runtime.tiny import build_tiny_pair

    teacher_dir, student_dir = build_tiny_pair(work / "tiny")
    ref_loss, ref_grad = first_step("cpu", torch.float32, teacher_dir, student_dir, work)
    loss, grad = first_step(device, torch.bfloat16, teacher_dir, student_dir, work)
    rel = abs(loss - ref_loss) / max(abs(ref_loss), 1e-8)
    cos = float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0))
    ok = rel < 0.02 and cos > 0.99
    line("bf16_step", ok, f"{device} bf16 loss {loss:.6f} vs cpu fp32 {ref_loss:.6f} (rel {rel:.2e} < 2e-2); "
                          f"gradient cosine {cos:.5f} (> 0.99)")
    return ok


class GpuMemory:
    """Peak memory.used of GPU 0 while a block runs, from nvidia-smi (None where it is missing)."""

    def __init__(self) -> None:
        self.peak_mib: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _read(self) -> float | None:
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def _poll(self) -> None:
        while not self._stop.is_set():
            if (used := self._read()) is not None:
                self.peak_mib = used if self.peak_mib is None else max(self.peak_mib, used)
            self._stop.wait(0.2)

    def __enter__(self) -> GpuMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(2)


def run_bench(name: str, args: list[str], timeout_s: float) -> bool:
    started = time.monotonic()
    with GpuMemory() as memory:
        try:
            proc = subprocess.run([sys.executable, str(BENCH / f"{name}.py"), *args], cwd=REPO, capture_output=True,
                                  text=True, timeout=timeout_s)
            output, errors, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as exc:
            output, errors, rc = exc.stdout or "", exc.stderr or "", -1
    if isinstance(output, bytes):
        output, errors = output.decode(errors="replace"), errors.decode(errors="replace")
    source = output if rc == 0 else output + errors  # a bench's last stdout line is its ratio
    last = next((ln for ln in reversed(source.splitlines()) if ln.strip()), "no output")
    memory_text = "n/a" if memory.peak_mib is None else f"{memory.peak_mib:.0f} MiB"
    line(name, rc == 0, f"{last.strip()[:200]} | peak GPU memory {memory_text} | {time.monotonic() - started:.0f} s"
                        + ("" if rc == 0 else f" | exit {rc}"))
    return rc == 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (the real check) or cpu (a dry run of the code)")
    p.add_argument("--quick", action="store_true", help="the smallest bench settings (a dry run on the CPU)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        line("cuda", False, "no CUDA device: run this on the GPU machine (bash scripts/gpu-check.sh)")
        return 2
    if args.device.startswith("cuda"):
        line("cuda", None, f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    ok = True
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        ok &= check_bf16(args.device, Path(tmp))
        if args.device.startswith("cuda"):
            peak = torch.cuda.max_memory_allocated() / 2**20
            line("bf16_step_memory", None, f"peak torch allocation {peak:.0f} MiB")
    small = ["--rounds", "2"] if args.quick else []
    ok &= run_bench("train_throughput", [*small, "--steps", "4"] if args.quick else ["--rounds", "4"], 180)
    ok &= run_bench("scoring_efficiency", [*small, "-n", "64"] if args.quick else ["-n", "512", "--rounds", "4"], 150)
    ok &= run_bench("serving_overhead", [*small, "--requests", "32", "--sink", "memory"] if args.quick else
                    ["--requests", "128", "--rounds", "4"], 150)
    line("all", ok, "every check passed" if ok else "see the failing lines above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
