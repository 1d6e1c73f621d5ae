"""Read a queries file (CSV, JSON lines / JSON list, Parquet) into a validated query plan.

Only a file that cannot be read at all is fatal (``QueryFileError``).  Everything inside is
read as text and validated here, so one bad value becomes that row's ``error`` and the rows
around it are still searched.  Query images are confined to allowed roots (after following
symlinks) because a queries file may come from someone other than the operator, and the
LanceDB prefilter is built only from escaped literals and known column names for the same reason.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
from dataclasses import dataclass

import polars as pl
import pyarrow as pa

from schemas.queries import BOUND_COLUMNS, INPUT_COLUMNS, MODES, QUERY_PLAN_SCHEMA
from schemas.tables import SCORE_COLUMNS

_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_INTEGER = re.compile(r"^[+-]?\d+(\.0*)?$")
_MODE_HINT = "use " + ", ".join(MODES[:-1]) + " or " + MODES[-1]
#: one parsed input row: raw values by (normalised) column, or the reason it could not be parsed
Record = tuple[dict[str, object] | None, str | None]


class QueryFileError(Exception):
    """Fatal, one line: missing file, unknown format, unparseable file."""


@dataclass(frozen=True)
class _Context:
    base_dir: str
    roots: tuple[str, ...]
    default_top_k: int
    max_top_k: int


def read_queries(path: str, *, image_roots: list[str], default_top_k: int = 5,
                 max_top_k: int = 100) -> tuple[pl.DataFrame, list[str]]:
    """-> (plan with exactly QUERY_PLAN_SCHEMA's columns/types, warnings such as unknown columns)"""
    if not 1 <= default_top_k <= max_top_k:
        raise ValueError(f"default_top_k {default_top_k} is not in 1..{max_top_k}")
    records, warnings = _normalise_columns(_load(path))
    if not records:
        warnings.append(f"no queries in {path}")
    ctx = _Context(os.path.dirname(os.path.abspath(path)),
                   tuple(os.path.realpath(r) for r in image_roots), default_top_k, max_top_k)
    rows = [_validate(i, rec, err, ctx) for i, (rec, err) in enumerate(records)]
    _flag_duplicates(rows)
    for row in rows:
        errors = row.pop("errors")
        row["error"] = "; ".join(errors) if errors else None
        if not errors:
            bounds = {s: (row[f"min_{s}"], row[f"max_{s}"]) for s in SCORE_COLUMNS}
            row["where"] = build_where(row["city"], bounds)
    return pl.from_arrow(pa.Table.from_pylist(rows, schema=QUERY_PLAN_SCHEMA)), warnings


def build_where(city: str | None,
                bounds: dict[str, tuple[float | None, float | None]]) -> str | None:
    """LanceDB SQL prefilter; None when there is no filter.

    The city is a single-quoted literal with quotes doubled (LanceDB's parser treats backslash
    literally, so nothing else needs escaping); numbers go through ``repr(float)`` after a
    finiteness check, and only names from SCORE_COLUMNS are ever interpolated.
    """
    parts = []
    if city is not None:
        if "\x00" in city:
            raise ValueError("city contains a NUL character")
        parts.append("city = '" + city.replace("'", "''") + "'")
    unknown = sorted(set(bounds) - set(SCORE_COLUMNS))
    if unknown:
        raise ValueError(f"unknown score columns {unknown}; expected some of {SCORE_COLUMNS}")
    for score in SCORE_COLUMNS:
        for op, value in zip((">=", "<="), bounds.get(score, (None, None)), strict=True):
            if value is None:
                continue
            number = float(value)
            if not math.isfinite(number):
                raise ValueError(f"bound for {score} is not finite: {value!r}")
            parts.append(f"{score} {op} {number!r}")
    return " AND ".join(f"({p})" for p in parts) or None


# --- reading -------------------------------------------------------------------------------


def _load(path: str) -> list[Record]:
    """Dispatch on the suffix; every failure to read the file as a whole is one-line fatal."""
    if os.path.isdir(path):
        raise QueryFileError(f"queries file {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise QueryFileError(f"queries file not found: {path}")
    fmt = _FORMATS.get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise QueryFileError(f"queries file {path} has an unknown format; name it "
                             + ", ".join(f"*{s}" for s in _FORMATS))
    try:
        with open(path, "rb") as f:
            data = f.read()
        if fmt == "parquet":
            return [(r, None) for r in pl.read_parquet(io.BytesIO(data)).to_dicts()]
        text = data.decode("utf-8-sig")
        if not text.strip():
            return []
        if fmt == "csv":
            frame = pl.read_csv(io.BytesIO(text.encode()), infer_schema=False)
            return [(r, None) for r in frame.to_dicts()]
        return _read_json(text, fmt)
    except UnicodeDecodeError as e:
        raise QueryFileError(f"queries file {path} is not valid UTF-8 (byte {e.start})") from e
    except OSError as e:
        raise QueryFileError(f"cannot read queries file {path}: {e.strerror or e}") from e
    except Exception as e:  # noqa: BLE001 - any parser failure is the same fatal, readable error
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise QueryFileError(f"cannot parse queries file {path} as {fmt}: "
                             f"{type(e).__name__}: {first}") from e


def _read_json(text: str, fmt: str) -> list[Record]:
    """A JSON list (``.json`` only) or JSON lines; a malformed line is a row, not a failure."""
    if fmt == "json" and text.lstrip().startswith("["):
        items = json.loads(text)  # a broken list has no trustworthy rows: fatal
        return [_object(item, f"item {i}") for i, item in enumerate(items)]
    records, parsed = [], 0
    for n, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 is data
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            records.append((None, f"line {n} is not valid JSON: {e.msg} (column {e.colno})"))
            continue
        parsed += 1
        records.append(_object(item, f"line {n}"))
    if not parsed:
        raise ValueError("no line is valid JSON (expected one JSON object per line)")
    return records


def _object(item: object, where: str) -> Record:
    if isinstance(item, dict):
        return item, None
    return None, f"{where} is not a JSON object"


def _normalise_columns(records: list[Record]) -> tuple[list[Record], list[str]]:
    """Keys → stripped lower case; unknown and clashing columns become warnings."""
    unknown: dict[str, None] = {}
    clashes: dict[str, None] = {}
    out: list[Record] = []
    for rec, err in records:
        if rec is None:
            out.append((None, err))
            continue
        clean: dict[str, object] = {}
        for key, value in rec.items():
            name = str(key).strip().lstrip("\ufeff").strip().lower()
            if name not in INPUT_COLUMNS:
                unknown[str(key)] = None
            elif name in clean:
                clashes[f"{key!r} repeats {name!r}"] = None
            else:
                clean[name] = value
        out.append((clean, None))
    warnings = []
    if unknown:
        warnings.append("ignoring unknown columns: " + ", ".join(map(repr, unknown)))
    if clashes:
        warnings.append("duplicate columns, the first is used: " + "; ".join(clashes))
    return out, warnings


# --- validating ----------------------------------------------------------------------------


def _validate(i: int, rec: dict[str, object] | None, err: str | None, ctx: _Context) -> dict:
    """One input row → one plan row with a list of ``errors`` (joined by the caller)."""
    row: dict = dict.fromkeys(QUERY_PLAN_SCHEMA.names) | {"row": i, "errors": []}
    raw = {c: _as_text((rec or {}).get(c)) for c in INPUT_COLUMNS}
    row["query_id"] = raw["query_id"] or f"q{i + 1:05d}"
    if rec is None:
        row["errors"].append(err)
        return row
    errors = row["errors"]
    row["text"], row["image"] = raw["text"], raw["image"]
    row["mode"] = _mode(raw["mode"], raw["text"] is not None, raw["image"] is not None, errors)
    if raw["image"] is not None:
        row["image_path"] = _image_path(raw["image"], ctx, errors)
    row["top_k"] = _top_k(raw["top_k"], ctx, errors)
    row["city"] = raw["city"]
    if row["city"] is not None and "\x00" in row["city"]:
        errors.append("city contains a NUL character")
    row.update(_bounds(raw, errors))
    return row


def _as_text(value: object) -> str | None:
    """Any cell (CSV string, JSON value, Parquet value) → stripped text, "" → None."""
    if value is None:
        return None
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = repr(value)
    elif isinstance(value, dict | list):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    return text.strip() or None


def _mode(raw: str | None, has_text: bool, has_image: bool, errors: list[str]) -> str | None:
    if not has_text and not has_image:
        errors.append("row has no text and no image")
        return None
    if raw is None:
        return "hybrid" if has_text and has_image else "text" if has_text else "image"
    mode = raw.lower()
    if mode not in MODES:
        errors.append(f"unknown mode {raw[:40]!r}; {_MODE_HINT}")
        return None
    if mode in ("text", "caption", "hybrid") and not has_text:
        errors.append(f"mode {mode!r} needs text")
    if mode == "image" and not has_image:
        errors.append("mode 'image' needs an image")
    return mode


def _top_k(raw: str | None, ctx: _Context, errors: list[str]) -> int | None:
    """Whole numbers only ("5" or "5.0" from a float column); no exponents, no fractions."""
    if raw is None:
        return ctx.default_top_k
    value = int(float(raw)) if _INTEGER.match(raw) and len(raw) <= 20 else None
    if value is None or not 1 <= value <= ctx.max_top_k:
        errors.append(f"top_k must be an integer from 1 to {ctx.max_top_k}, got {raw[:40]!r}")
        return None
    return value


def _bounds(raw: dict[str, str | None], errors: list[str]) -> dict[str, float | None]:
    """min_/max_ bounds as float32-exact floats, so the filter and the plan agree bit for bit."""
    out: dict[str, float | None] = {}
    for column in BOUND_COLUMNS:
        text = raw[column]
        try:
            value = None if text is None else _float32(text)
        except (ValueError, OverflowError):
            errors.append(f"{column} must be a finite number, got {text[:40]!r}")
            value = None
        out[column] = value
    for score in SCORE_COLUMNS:
        lo, hi = out[f"min_{score}"], out[f"max_{score}"]
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"min_{score} {lo!r} is greater than max_{score} {hi!r}")
    return out


def _float32(text: str) -> float:
    """Finite as float32 too: just above FLT_MAX, ``pack`` rounds to inf instead of raising."""
    value = struct.unpack("f", struct.pack("f", float(text)))[0]
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _image_path(raw: str, ctx: _Context, errors: list[str]) -> str | None:
    """The resolved local file, or None with an error; the roots are checked before existence."""
    if "://" in raw:
        errors.append("URLs are not allowed for query images; give a file path")
        return None
    if "\x00" in raw:
        errors.append("query image path contains a NUL character")
        return None
    resolved = os.path.realpath(os.path.join(ctx.base_dir, raw))
    if not any(os.path.commonpath([resolved, root]) == root for root in ctx.roots):
        errors.append(f"query image {raw} is outside the allowed roots")
        return None
    if not os.path.isfile(resolved):
        errors.append(f"query image not found: {resolved}")
        return None
    return resolved


def _flag_duplicates(rows: list[dict]) -> None:
    """A repeated query_id would make answers ambiguous: the first row keeps it."""
    seen: set[str] = set()
    for row in rows:
        if row["query_id"] in seen:
            row["errors"].append(f"duplicate query_id {row['query_id']!r}")
        seen.add(row["query_id"])
