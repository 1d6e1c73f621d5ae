"""Export a LLaVA instruction dataset from the ``images`` table (and reviewed answers).

Teams adapting LLaVA to their images already hold the supervision in their tables: captions,
cities and perception scores.  Templated questions turn each image row into a multi-turn
conversation whose answers are read (or, for scores, ranked) straight from the row, so every
answer can be checked against the table.  Reviewed answers of query runs add records in the
exact form the model saw at query time (the stored prompt and the same image grid).

The split is a hash of ``image_id`` (salted by ``seed``): adding rows never moves an image to
the other split, and an image never lands in both.  Image files are named by their sha256 under
``OUT_DIR/images`` (hardlinked or copied after checking the bytes still hash to ``image_id``),
so no path taken from the data is ever used to write.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import polars as pl

from schemas.instructions import (
    IMAGE_TOKEN,
    IMAGES_DIR,
    MANIFEST,
    SPLIT_FILES,
    SPLITS,
    InstructionRecord,
)
from schemas.tables import SCORE_COLUMNS
from tasks.adapt.answer_records import answer_records
from tasks.adapt.options import ExportOptions, InstructionError, split_of
from tasks.io import atomic, store
from tasks.io.images import Rejected, read_bytes
from tasks.io.objstore import StorageConfig, is_local

COLUMNS = ["image_id", "source_uri", "rel_path", "city", "caption", *SCORE_COLUMNS]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp"}
_HEX = re.compile(r"[0-9a-f]{64}")

#: (adjective, comparative) per perception score, for questions and answers
SCORE_WORDS = {
    "livelier": ("lively", "livelier"), "more_beautiful": ("beautiful", "more beautiful"),
    "more_boring": ("boring", "more boring"), "more_depressing": ("depressing", "more depressing"),
    "safer": ("safe", "safer"), "wealthier": ("wealthy", "wealthier"),
}
QUESTIONS = {
    "describe": ("Describe this street scene.", "What can you see in this photo?",
                 "Give a short description of this image."),
    "city": ("Which city was this photo taken in?", "In which city is this place?"),
    "score": ("How {adj} does this place look compared with the other places in the dataset?",
              "Relative to the rest of the dataset, how {adj} does this place look?"),
}


def _pick(options: tuple[str, ...], *key: str) -> str:
    """A paraphrase chosen by hash: varied across images, identical on every re-run."""
    digest = hashlib.sha256("\0".join(key).encode()).digest()
    return options[int.from_bytes(digest[:4], "big") % len(options)]


def score_stats(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """Sorted finite values of each score column: the reference for "compared with the dataset"."""
    stats = {}
    for col in SCORE_COLUMNS:
        values = frame[col].drop_nulls().cast(pl.Float64).to_numpy()
        stats[col] = np.sort(values[np.isfinite(values)])
    return stats


def percentile(values: np.ndarray, value: float) -> int:
    """Share of the dataset's values strictly below ``value``, in whole percent."""
    return round(100 * int(np.searchsorted(values, value, side="left")) / max(len(values), 1))


def image_turns(row: dict, stats: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    """(question, answer) pairs for one image row; fields that are null are simply not asked."""
    iid, turns = row["image_id"], []
    caption = next((s.strip() for s in (row["caption"] or "").splitlines() if s.strip()), None)
    if caption:
        turns.append((_pick(QUESTIONS["describe"], iid, "describe"), caption))
    if row["city"]:
        turns.append((_pick(QUESTIONS["city"], iid, "city"),
                      f"This photo was taken in {row['city']}."))
    for col in SCORE_COLUMNS:
        value = row[col]
        if value is None or not np.isfinite(value):
            continue
        adj, comparative = SCORE_WORDS[col]
        question = _pick(QUESTIONS["score"], iid, col).format(adj=adj)
        answer = (f"It looks {comparative} than {percentile(stats[col], value)}% of the "
                  f"{len(stats[col])} places in this dataset ({col} score {value:.2f}).")
        turns.append((question, answer))
    return [(q, a.replace(IMAGE_TOKEN, "")) for q, a in turns]


def make_record(record_id: str, image: str, turns: list[tuple[str, str]]) -> InstructionRecord:
    """Turns → a validated record; the image placeholder opens the first question."""
    conversations = []
    for i, (question, answer) in enumerate(turns):
        human = f"{IMAGE_TOKEN}\n{question}" if i == 0 else question
        conversations += [{"from": "human", "value": human}, {"from": "gpt", "value": answer}]
    return InstructionRecord(id=record_id, image=image, conversations=conversations)


def place_image(row: dict, out_dir: Path, mode: str, storage: StorageConfig | None) -> str:
    """Put the image under ``images/<id[:2]>/<id><ext>``; returns that relative path.

    The bytes are read and hashed first: a file edited since ingest no longer matches its row
    (its caption and scores would describe other pixels), so it is skipped, not exported."""
    image_id, uri = row["image_id"], row["source_uri"]
    if not _HEX.fullmatch(image_id or ""):
        raise Rejected("image_id", "image_id is not a sha256 hex digest")
    ext = Path(row["rel_path"] or "").suffix.lower()
    rel = f"{image_id[:2]}/{image_id}{ext if ext in IMAGE_EXTS else '.img'}"
    dst = out_dir / IMAGES_DIR / rel
    if dst.is_file():  # content-addressed: a previous export already put these bytes here
        return rel
    data = read_bytes(uri, storage)
    if hashlib.sha256(data).hexdigest() != image_id:
        raise Rejected("changed", "the file's bytes changed since ingest")
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "link" and is_local(uri):
        try:
            os.link(uri.removeprefix("file://"), dst)
            return rel
        except FileExistsError:
            return rel
        except OSError:  # another filesystem, or links not allowed: copy instead
            pass
    atomic.write_bytes(dst, data)
    return rel


def read_images(db_uri: str, table: str,
                storage: StorageConfig | None) -> tuple[pl.DataFrame, int]:
    """The columns the templates need (no vectors), sorted by image_id, and the table version."""
    try:
        tbl = store.connect(db_uri, storage).open_table(table)
    except ValueError as e:
        raise InstructionError(f"no '{table}' table in {db_uri}: run mmrag ingest first") from e
    version = tbl.version
    tbl.checkout(version)  # the manifest's version is the one read, even while ingests write
    return tbl.to_polars().select(COLUMNS).collect().sort("image_id"), version


def table_records(frame: pl.DataFrame, out_dir: Path, opts: ExportOptions,
                  storage: StorageConfig | None, skipped: Counter) -> dict[str, list[dict]]:
    """One multi-turn record per image row, placed in its split."""
    stats = score_stats(frame)
    rows = frame.head(opts.limit) if opts.limit is not None else frame
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for row in rows.iter_rows(named=True):
        turns = image_turns(row, stats)
        if not turns:
            skipped["no caption, city or score"] += 1
            continue
        try:
            image = place_image(row, out_dir, opts.mode, storage)
        except Rejected as e:
            skipped[f"image {e.stage}"] += 1
            continue
        record = make_record(f"{row['image_id'][:16]}-img", image, turns)
        out[split_of(row["image_id"], opts.val_fraction, opts.seed)].append(record.to_json())
    return out


def write_split(out_dir: Path, split: str, records: list[dict]) -> None:
    data = json.dumps(sorted(records, key=lambda r: r["id"]), ensure_ascii=False, indent=1)
    atomic.write_bytes(out_dir / SPLIT_FILES[split], data.encode())


def export_instructions(db_uri: str, table: str, out_dir: str | Path, opts: ExportOptions,
                        answers: pl.DataFrame | None = None,
                        storage: StorageConfig | None = None) -> dict:
    """Write ``train.json``, ``val.json``, the images and ``export.json``; return the manifest.

    ``answers``: rows chosen by ``tasks.adapt.answer_records.select_answers``.  The score answers
    rank each value among all rows of the table, also when ``limit`` exports fewer images."""
    if not 0 <= opts.val_fraction < 1:
        raise InstructionError("--val-fraction must be in [0, 1)")
    out = Path(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    frame, version = read_images(db_uri, table, storage)
    skipped: Counter = Counter()
    records = table_records(frame, out, opts, storage, skipped)
    if answers is not None:
        for split, recs in answer_records(answers, out, opts, storage, skipped).items():
            records[split].extend(recs)
    for split in SPLITS:
        write_split(out, split, records[split])
    manifest = {"db": db_uri, "table": table, "table_version": version,
                "val_fraction": opts.val_fraction, "seed": opts.seed, "mode": opts.mode,
                "records": {s: len(records[s]) for s in SPLITS},
                "images": {s: len({r["image"] for r in records[s]}) for s in SPLITS},
                "skipped": dict(sorted(skipped.items())), "out_dir": str(out)}
    atomic.write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def load_split(dataset_dir: str | Path, split: str) -> list[InstructionRecord]:
    """Read and validate one split (a missing file is an empty split)."""
    path = Path(dataset_dir) / SPLIT_FILES[split]
    if not path.is_file():
        return []
    return [InstructionRecord.model_validate(r) for r in json.loads(path.read_text())]

