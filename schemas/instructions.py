"""Instruction data: what ``mmrag export-instructions`` writes and ``mmrag finetune`` reads.

The LLaVA training format (``LLaVA/llava/train/train.py``, and most forks and trainers that
copied it), so an exported folder also trains with those tools::

    OUT_DIR/
      train.json, val.json   JSON lists of InstructionRecord
      images/<id[:2]>/<id>.<ext>   the image bytes (image_id = sha256), hardlinked or copied
      images/grids/<key>.png       query-flow grids, for records made from reviewed answers
      export.json            manifest: source table and version, counts, skipped rows and why

A record::

    {"id": "3f9a…-img", "image": "3f/3f9a….jpg",
     "conversations": [{"from": "human", "value": "<image>\\nDescribe this street scene."},
                       {"from": "gpt", "value": "A quiet street with…"},
                       {"from": "human", "value": "Which city was this photo taken in?"},
                       {"from": "gpt", "value": "This photo was taken in Paris."}]}

``image`` is relative to ``OUT_DIR/images`` (LLaVA's ``--image_folder``).  Turns alternate
human/gpt, starting with human and ending with gpt; the ``<image>`` placeholder appears exactly
once, at the start of the first human turn (where the llava-1.5 prompt puts it).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

IMAGE_TOKEN = "<image>"  # noqa: S105 - a placeholder token, not a secret
IMAGES_DIR = "images"
SPLITS = ("train", "val")
SPLIT_FILES = {split: f"{split}.json" for split in SPLITS}
MANIFEST = "export.json"

#: question types of records made from the ``images`` table, in turn order
QUESTION_TYPES = ("describe", "city", "score")
#: records made from answers (the query flow's prompt and grid, the reviewed answer)
ANSWER_TYPE = "answer"

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_PART = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def safe_relative(path: str) -> bool:
    """A '/'-separated relative path whose parts are plain names: it cannot leave its root."""
    parts = path.split("/")
    return all(_PART.fullmatch(p) and p not in (".", "..") for p in parts) and bool(path)


class Turn(BaseModel):
    """One message; ``from`` is a Python keyword, hence the alias."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    from_: Literal["human", "gpt"] = Field(alias="from", description="who speaks")
    value: str = Field(min_length=1, description="message text")


class InstructionRecord(BaseModel):
    """One training example: an image and a conversation about it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="unique, stable id: <image_id[:16]>-img or answer-<hash>")
    image: str = Field(description="path relative to OUT_DIR/images, '/' separators")
    conversations: list[Turn] = Field(min_length=2, description="human/gpt turns")

    @model_validator(mode="after")
    def _check(self) -> InstructionRecord:
        if not _ID.fullmatch(self.id):
            raise ValueError(f"id {self.id!r}: letters, digits, '.', '_', '-' only")
        if not safe_relative(self.image):
            raise ValueError(f"image {self.image!r} must be a plain relative path")
        speakers = [t.from_ for t in self.conversations]
        if len(speakers) % 2 or speakers != ["human", "gpt"] * (len(speakers) // 2):
            raise ValueError("turns must alternate human/gpt, starting human, ending gpt")
        first = self.conversations[0].value
        if not first.startswith(IMAGE_TOKEN + "\n"):
            raise ValueError(f"the first human turn must start with '{IMAGE_TOKEN}\\n'")
        if sum(t.value.count(IMAGE_TOKEN) for t in self.conversations) != 1:
            raise ValueError(f"'{IMAGE_TOKEN}' must appear exactly once")
        return self

    def to_json(self) -> dict:
        return self.model_dump(by_alias=True)
