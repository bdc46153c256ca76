"""`python -m shadow_scoring --bootstrap-servers HOST:PORT --store-url URL --teacher DIR|URL [...]`: one scorer
replica, flags as `ScoringConfig`'s fields (the same as `shadow-distill score run`, without the application
shell); prints its final stats as JSON on SIGTERM/SIGINT.

Start N of them with one `--group-id` to split a topic's partitions N ways (each with its own
`--metrics-port`); the group moves partitions when one joins, stops or dies.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from foundation.errors import ShadowDistillError
from foundation.flags import add_model_flags, model_from_args
from shadow_scoring.config import ScoringConfig
from shadow_scoring.consumer import ScoringService


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shadow_scoring", description=__doc__.split("\n")[0])
    add_model_flags(parser, ScoringConfig)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "httpx"):  # a line per fetch or per teacher request otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        with ScoringService.from_config(model_from_args(ScoringConfig, args)) as service:
            print(json.dumps(service.run()), flush=True)
    except ShadowDistillError as exc:
        print(f"python -m shadow_scoring: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
