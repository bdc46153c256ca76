"""One rank of a distributed training run on examples saved by a test (tests/integration/test_distributed_train.py).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/support/ddp_probe.py CASE_DIR OUT_DIR
"""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from nightly_train.config import TrainConfig  # noqa: E402
from nightly_train.train import Distiller  # noqa: E402


def main() -> None:
    import torch

    torch.set_num_threads(1)
    case, out = Path(sys.argv[1]), Path(sys.argv[2])
    cfg = TrainConfig.model_validate({**json.loads((case / "config.json").read_text()), "output_dir": str(out)})
    examples, prompts = pickle.loads((case / "examples.pkl").read_bytes())
    result = Distiller(cfg, examples, prompts).run(progress=False)
    if result.steps:
        (out / f"history-rank{torch.distributed.get_rank() if torch.distributed.is_initialized() else 0}.json"
         ).write_text(json.dumps(result.history))


if __name__ == "__main__":
    main()
