"""A four-record instruction dataset for the fine-tuning tests (no table, no export)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

ANSWERS = ["The street is busy with cars.", "A green tree grows next to a red car.",
           "The city at night is bright.", "Two dogs play in the park."]
QUESTION = "Describe this street scene."


def write_dataset(root: Path) -> Path:
    """Four coloured images, two-turn conversations; val = one train record (overfit check)."""
    (root / "images" / "c").mkdir(parents=True)
    records = []
    for i, (colour, answer) in enumerate(zip(["red", "green", "blue", "yellow"], ANSWERS)):
        Image.new("RGB", (40, 30), colour).save(root / "images" / "c" / f"{colour}.png")
        records.append({"id": f"r{i}", "image": f"c/{colour}.png", "conversations": [
            {"from": "human", "value": f"<image>\n{QUESTION}"}, {"from": "gpt", "value": answer},
            {"from": "human", "value": "Which city is this?"},
            {"from": "gpt", "value": f"This photo was taken in City{i}."}]})
    (root / "train.json").write_text(json.dumps(records))
    (root / "val.json").write_text(json.dumps(records[:1]))
    return root
