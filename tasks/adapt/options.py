"""What an instruction export is asked for, and how images are split: shared by the export of
table rows (``export``) and of query answers (``answer_records``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


class InstructionError(Exception):
    """A fatal export problem (no such table or run, unreadable reviewed file)."""


@dataclass(frozen=True)
class ExportOptions:
    val_fraction: float = 0.1
    seed: int = 0
    mode: str = "link"  # link (hardlink, copy across devices) | copy
    limit: int | None = None
    max_pixels: int = 64_000_000


def split_of(image_id: str, val_fraction: float, seed: int = 0) -> str:
    """``val`` for a stable pseudo-random ``val_fraction`` of image ids, else ``train``."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return "val" if int.from_bytes(digest[:8], "big") / 2**64 < val_fraction else "train"
