"""Instruction records → training tensors for LLaVA: llava-1.5 prompts, labels on answers only.

Prompts use the same format as the query engines (``tasks.models.engines.format_prompt``), so what
is
trained is what is asked later: ``USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT:
{a2}</s>``.  Labels cover only the gpt turns and their end-of-sequence token: the model learns
to answer, not to reproduce questions or image tokens.  Images are read per batch, so a large
dataset never sits in memory as pixels.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

from schemas.instructions import IMAGE_TOKEN, InstructionRecord
from tasks.models.engines import format_prompt

IGNORE = -100


def encode(record: InstructionRecord, processor, images_dir: Path, max_length: int) -> dict:
    """input_ids / labels / pixel_values for one record; labels are IGNORE outside gpt turns."""
    from PIL import Image

    tok = processor.tokenizer
    with Image.open(images_dir / record.image) as im:
        image = im.convert("RGB")
    turns = record.conversations
    first = format_prompt(turns[0].value.removeprefix(IMAGE_TOKEN + "\n"), True,
                          processor.image_token)
    inputs = processor(images=[image], text=[first], return_tensors="pt")
    ids, labels = inputs["input_ids"][0].tolist(), []
    labels = [IGNORE] * len(ids)
    for i in range(0, len(turns), 2):
        if i:
            human = tok(format_prompt(turns[i].value, False), add_special_tokens=False).input_ids
            ids, labels = ids + human, labels + [IGNORE] * len(human)
        answer = tok(" " + turns[i + 1].value, add_special_tokens=False).input_ids
        answer.append(tok.eos_token_id)
        ids, labels = ids + answer, labels + answer
    return {"input_ids": ids[:max_length], "labels": labels[:max_length],
            "pixel_values": inputs["pixel_values"][0]}


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-padded batch (training needs no left padding); padding is masked and ignored."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[row, :n] = torch.tensor(e["input_ids"])
        labels[row, :n] = torch.tensor(e["labels"])
        mask[row, :n] = 1
    pixels = torch.stack([e["pixel_values"] for e in examples])
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixels}


def batches(records: list[InstructionRecord], processor, images_dir: Path, batch_size: int,
            max_length: int, rng: random.Random | None) -> Iterator[dict]:
    """Encoded batches, shuffled when ``rng`` is given; records with nothing to learn dropped."""
    order = list(range(len(records)))
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), batch_size):
        examples = [encode(records[i], processor, images_dir, max_length)
                    for i in order[start:start + batch_size]]
        examples = [e for e in examples if any(t != IGNORE for t in e["labels"])]
        if examples:
            yield collate(examples, processor.tokenizer.pad_token_id)
