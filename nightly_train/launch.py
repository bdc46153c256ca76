"""One rank of a night's distributed training: what `pipeline.train` runs under torchrun (`train.processes` > 1).

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m nightly_train.launch \\
        --config nightly.json --window-start 2026-11-24T02:00Z --window-end 2026-11-25T02:00Z --run-id <mlflow run>
"""

from __future__ import annotations

import argparse
import logging
from datetime import datetime


def main(argv: list[str] | None = None) -> None:
    from nightly_train.config import NightlyConfig
    from nightly_train.pipeline import Night, fit

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--window-start", required=True, type=datetime.fromisoformat)
    p.add_argument("--window-end", required=True, type=datetime.fromisoformat)
    p.add_argument("--run-id", required=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    fit(Night(NightlyConfig.from_json_file(args.config), args.window_start, args.window_end), args.run_id)


if __name__ == "__main__":
    main()
