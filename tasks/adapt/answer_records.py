"""Instruction records from query-run answers: the stored prompt, the same grid, the answer.

What counts as usable: ``--answers RUN_ID`` takes that run's rows that have an answer and no
error — a mechanical filter, not a judgement of quality.  ``--reviewed FILE`` (CSV, JSONL or
Parquet with ``run_id``, ``query_id`` and optionally ``answer``) keeps only the rows a person
accepted, and a non-empty ``answer`` there replaces the model's text (a correction).

A record reproduces the model's input: the prompt column as the human turn and the grid of
the retrieved photos, rebuilt with the query flow's own ``build_grid``/``load_thumbnail``.
Rows whose query had its own photo are skipped (the query photo is not stored), and so are rows
whose grid mixes train and validation images (that would leak an image across splits).
"""

from __future__ import annotations

import hashlib
import io
from collections import Counter
from pathlib import Path

import polars as pl

from schemas.instructions import ANSWER_TYPE, IMAGE_TOKEN, IMAGES_DIR, SPLITS, InstructionRecord
from tasks.adapt.options import ExportOptions, InstructionError, split_of
from tasks.io import atomic
from tasks.io.answers import read_answers
from tasks.io.objstore import StorageConfig
from tasks.query.prompts import build_grid, load_thumbnail

ANSWER_COLUMNS = ["run_id", "query_id", "query_image", "prompt", "prompt_images", "retrieved",
                  "answer"]


def read_reviewed(path: str | Path) -> pl.DataFrame:
    """(run_id, query_id, corrected answer or null) rows a person accepted."""
    path = Path(path)
    readers = {".csv": pl.read_csv, ".jsonl": pl.read_ndjson, ".parquet": pl.read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None or not path.is_file():
        raise InstructionError(f"reviewed file {path}: expected an existing .csv/.jsonl/.parquet")
    try:
        frame = reader(path, infer_schema_length=None) if reader is not pl.read_parquet \
            else reader(path)
    except Exception as e:  # noqa: BLE001 - any parse error is a one-line fatal error
        raise InstructionError(f"cannot read reviewed file {path}: {e}") from e
    if not {"run_id", "query_id"} <= set(frame.columns):
        raise InstructionError(f"reviewed file {path} needs run_id and query_id columns")
    answer = pl.col("answer") if "answer" in frame.columns else pl.lit(None)
    return frame.select(pl.col("run_id").cast(pl.String), pl.col("query_id").cast(pl.String),
                        reviewed_answer=answer.cast(pl.String)).unique(["run_id", "query_id"])


def select_answers(out_root: str, run_ids: list[str], reviewed: str | Path | None = None,
                   storage: StorageConfig | None = None) -> pl.DataFrame:
    """Rows of ``run_ids`` with an answer and no error; only reviewed ones when given."""
    frame = (read_answers(out_root, storage).filter(pl.col("run_id").is_in(run_ids))
             .select(ANSWER_COLUMNS + ["error"]).collect())
    missing = sorted(set(run_ids) - set(frame["run_id"].to_list()))
    if missing:
        raise InstructionError(f"no answers for run(s) {', '.join(missing)} under {out_root}")
    frame = frame.filter(pl.col("error").is_null()).drop("error")
    if reviewed is not None:
        frame = (frame.join(read_reviewed(reviewed), on=["run_id", "query_id"], how="inner")
                 .with_columns(answer=pl.coalesce(
                     pl.col("reviewed_answer").str.strip_chars().replace("", None),
                     pl.col("answer")))
                 .drop("reviewed_answer"))
    return frame.filter(pl.col("answer").str.strip_chars().str.len_chars() > 0)


def _grid(row: dict, max_pixels: int, storage: StorageConfig | None):
    """The query flow's grid for this row, or a reason why it cannot be rebuilt."""
    from tasks.query.run import GRID_SIZE

    if row["query_image"]:
        return None, "answer has a query photo"
    hits = {h["image_id"]: h for h in row["retrieved"] or []}
    shown = row["prompt_images"] or []
    if not shown or any(i not in hits for i in shown):
        return None, "answer shows no retrieved image"
    tiles = [load_thumbnail(hits[i]["source_uri"], GRID_SIZE, max_pixels, storage) for i in shown]
    if any(t is None for t in tiles):
        return None, "answer image unreadable"
    return build_grid(tiles, [str(hits[i]["rank"]) for i in shown], GRID_SIZE), None


def answer_record(row: dict, out_dir: Path, opts: ExportOptions,
                  storage: StorageConfig | None) -> tuple[str | None, dict | None, str | None]:
    """(split, record, None) or (None, None, why it was skipped)."""
    splits = {split_of(i, opts.val_fraction, opts.seed) for i in row["prompt_images"] or []}
    if len(splits) > 1:
        return None, None, "answer grid spans both splits"
    grid, why = _grid(row, opts.max_pixels, storage)
    if grid is None:
        return None, None, why
    key = hashlib.sha256(f"{row['run_id']}\0{row['query_id']}".encode()).hexdigest()[:24]
    rel = f"grids/{key}.png"
    buf = io.BytesIO()
    grid.save(buf, "PNG")
    path = out_dir / IMAGES_DIR / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, buf.getvalue())
    human = f"{IMAGE_TOKEN}\n{(row['prompt'] or '').replace(IMAGE_TOKEN, '')}"
    record = InstructionRecord(id=f"{ANSWER_TYPE}-{key}", image=rel, conversations=[
        {"from": "human", "value": human},
        {"from": "gpt", "value": row["answer"].strip().replace(IMAGE_TOKEN, "")}])
    return splits.pop(), record.to_json(), None


def answer_records(frame: pl.DataFrame, out_dir: Path, opts: ExportOptions,
                   storage: StorageConfig | None, skipped: Counter) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for row in frame.iter_rows(named=True):
        split, record, why = answer_record(row, out_dir, opts, storage)
        if record is None:
            skipped[why] += 1
        elif record["id"] not in seen:  # a query_id repeated within a run: keep the first
            seen.add(record["id"])
            out[split].append(record)
    return out
