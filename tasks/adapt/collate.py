"""Instruction records → training tensors for LLaVA: llava-1.5 prompts, labels on answers only.

Prompts use the same format as the query engines (``tasks.models.engines.format_prompt``), so
what is trained is what is asked later:
``USER: <image>\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>``.  Labels cover only
the gpt turns and their end-of-sequence token: the model learns to answer, not to reproduce
questions or image tokens.  Images are read per record as it is fetched, so a large dataset
never sits in memory as pixels.

``InstructionDataset`` and ``Collator`` are what ``transformers.Trainer`` takes: a map-style
dataset of encoded records (records whose prompt leaves no room for an answer within
``max_length`` are dropped up front, from the text alone) and the padding collate function.
"""

from __future__ import annotations

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
    first = first_prompt(record, processor)
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


def first_prompt(record: InstructionRecord, processor) -> str:
    """The first human turn as the model sees it, with one ``<image>`` placeholder."""
    return format_prompt(record.conversations[0].value.removeprefix(IMAGE_TOKEN + "\n"), True,
                         processor.image_token)


def image_token_count(processor) -> int:
    """How many tokens the processor expands ``<image>`` into: fixed for LLaVA-1.5, whose
    images are resized and cropped to one size before the vision tower."""
    from PIL import Image

    inputs = processor(images=[Image.new("RGB", (8, 8))], text=[processor.image_token],
                       return_tensors="pt")
    return int((inputs["input_ids"][0] == processor.image_token_id).sum())


def prompt_length(record: InstructionRecord, processor, image_tokens: int) -> int:
    """Tokens before the first answer, from the text alone (no image is read): the processor's
    own expansion of ``<image>`` followed by the tokenizer, as in ``encode``."""
    text = first_prompt(record, processor).replace(processor.image_token,
                                                   processor.image_token * image_tokens)
    return len(processor.tokenizer(text).input_ids)


class InstructionDataset:
    """Map-style dataset for ``Trainer``: ``dataset[i]`` is ``encode`` of the i-th kept record.

    Records whose first prompt already fills ``max_length`` have no answer token to learn and
    are left out (``dropped``); images are read only when an item is fetched."""

    def __init__(self, records: list[InstructionRecord], processor, images_dir: Path,
                 max_length: int):
        n_image = image_token_count(processor) if records else 0
        self.records = [r for r in records if prompt_length(r, processor, n_image) < max_length]
        self.dropped = len(records) - len(self.records)
        self.processor, self.images_dir, self.max_length = processor, images_dir, max_length

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict:
        return encode(self.records[i], self.processor, self.images_dir, self.max_length)


class Collator:
    """``collate`` with the tokenizer's pad id: the Trainer's ``data_collator``."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: list[dict]) -> dict:
        return collate(examples, self.pad_id)
