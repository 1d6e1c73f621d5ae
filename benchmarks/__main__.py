"""``python -m benchmarks NAME...``: ingest, incremental, retrieval, hybrid, multiscale,
generation, caption_vectors, or all."""

from __future__ import annotations

import importlib
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
NAMES = ("ingest", "incremental", "retrieval", "hybrid", "multiscale", "generation",
         "caption_vectors")


def main(argv: list[str]) -> None:
    names = NAMES if not argv or argv == ["all"] else argv
    for name in names:
        if name not in NAMES:
            raise SystemExit(f"unknown benchmark {name!r}; choose from {', '.join(NAMES)}, all")
        print(f"== {name}", flush=True)
        importlib.import_module(f"benchmarks.{name}").main()


if __name__ == "__main__":
    main(sys.argv[1:])
