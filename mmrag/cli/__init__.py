"""The ``mmrag`` command line: every option has an ``MMRAG_*`` variable and a flag.

One module per command group; importing them registers their commands on ``app``, in the
order ``mmrag --help`` lists them (the pipeline's order).
"""

# isort: off
from mmrag.cli.app import app
from mmrag.cli import ingest, query, backfill, ops, evaluate, report, adapt  # noqa: F401
from mmrag.cli.exit import main

# isort: on

__all__ = ["app", "main"]
