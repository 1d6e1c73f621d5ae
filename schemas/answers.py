"""The answers contract: what analysts read from ``out/answers/run_date=YYYY-MM-DD/``.

One Parquet file per query run (``{run_id}.parquet``), one row per query, with full provenance:
which table version was searched, with which model and filter, what came back, which prompt
went to which engine, and what it answered (or why it failed).  ``run_date`` lives in the
partition path only (Hive style), so DuckDB/Polars add it as a column on read.

The file's key-value metadata carries ``mmrag.schema_version``; a change to this schema bumps
it, and readers keep accepting older versions.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.queries import BOUND_COLUMNS
from schemas.tables import SCORE_COLUMNS

# Version history (readers accept every older version; missing columns read as nulls):
#   1 - first release
#   2 - adds boxes, raw_answer, search_options
#   3 - adds n_context_dropped, prompt_token_budget (prompts fitted in the model's tokens)
#   4 - retrieved hits gain caption_similarity and spaces (the dual-space index); mode caption
SCHEMA_VERSION = "4"
ANSWERS_DIR = "answers"

RETRIEVED_TYPE = pa.struct(
    [
        ("rank", pa.int32()),
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("rel_path", pa.string()),
        ("city", pa.string()),
        ("lat", pa.float64()),
        ("lon", pa.float64()),
        ("caption", pa.string()),
        ("similarity", pa.float32()),
        ("score", pa.float32()),
        *[(c, pa.float32()) for c in SCORE_COLUMNS],
        ("caption_similarity", pa.float32()),
        ("spaces", pa.list_(pa.string())),
    ]
)

BOX_TYPE = pa.struct(
    [
        ("image_id", pa.string()),
        ("rank", pa.int32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("x2", pa.float32()),
        ("y2", pa.float32()),
    ]
)

ANSWER_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("query_id", pa.string()),
        ("query_text", pa.string()),
        ("query_image", pa.string()),
        ("mode", pa.string()),
        ("top_k", pa.int32()),
        ("city", pa.string()),
        *[(c, pa.float32()) for c in BOUND_COLUMNS],
        ("filter", pa.string()),
        ("db", pa.string()),
        ("images_table", pa.string()),
        ("table_version", pa.int64()),
        ("clip_model", pa.string()),
        ("search_options", pa.string()),
        ("retrieved", pa.list_(RETRIEVED_TYPE)),
        ("prompt", pa.string()),
        ("prompt_images", pa.list_(pa.string())),
        ("generator", pa.string()),
        ("generator_model", pa.string()),
        ("answer", pa.string()),
        ("raw_answer", pa.string()),
        ("boxes", pa.list_(BOX_TYPE)),
        ("citations", pa.list_(pa.int32())),
        ("n_prompt_tokens", pa.int32()),
        ("n_generated_tokens", pa.int32()),
        ("n_context_dropped", pa.int32()),
        ("prompt_token_budget", pa.int32()),
        ("error", pa.string()),
        ("error_stage", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
        ("retrieval_ms", pa.float32()),
        ("generation_ms", pa.float32()),
    ],
    metadata={"mmrag.schema_version": SCHEMA_VERSION, "mmrag.table": "answers"},
)

COLUMN_DOCS = {
    "run_id": "query run that wrote the row (re-running a run_id replaces its file)",
    "query_id": "from the queries file, or generated (q00001…) when absent",
    "query_text": "the question / text query",
    "query_image": "query image path as given",
    "mode": "text | image | caption | hybrid",
    "top_k": "images retrieved",
    "city": "city filter as given",
    "min_<score>, max_<score>": "perception-score bounds as given (six scores)",
    "filter": "the LanceDB prefilter built from them (SQL, escaped)",
    "db": "LanceDB URI searched",
    "images_table": "table searched",
    "table_version": "LanceDB version of images searched (time travel: checkout(version))",
    "clip_model": "CLIP model of query and image vectors",
    "search_options": "JSON of the search knobs used (nprobes, refine_factor, rerank_weight, "
    "rerank_depth, spaces, fusion, rrf_k, image/caption/text_weight) and spaces_used: the "
    "spaces this query searched (caption_note: why the caption space was left out)",
    "retrieved": "ranked hits: image_id, source_uri, city, caption, similarity, scores …",
    "prompt": "full text prompt sent to the VLM",
    "prompt_images": "image_ids shown to the VLM, in grid order",
    "generator": "engine: vllm | transformers | none",
    "generator_model": "generation model id or path",
    "answer": "generated text without its boxes (every [x1,y1,x2,y2] or [[x1,y1,x2,y2]] "
    "bracket of four numbers; null for engine none or on error)",
    "raw_answer": "the model's text exactly as generated",
    "boxes": "grounded regions: image_id + rank of the photo (null = the query photo), x1 y1 x2 "
    "y2 as fractions 0..1 of that photo's width/height",
    "citations": "[n] context ids cited by the answer",
    "n_prompt_tokens": "prompt tokens incl. image tokens, as counted by the engine",
    "n_generated_tokens": "tokens generated",
    "n_context_dropped": "retrieved items left out of the prompt's context to fit the token "
    "budget (lowest-ranked first; null for engine none or when no prompt was made)",
    "prompt_token_budget": "prompt tokens the model allows: max_model_len − max_new_tokens "
    "(image tokens included; null for engine none)",
    "error": "why this query has no answer (bad row, retrieval failure, question too long for "
    "the model, generation failure)",
    "error_stage": "query | retrieve | generate",
    "created_at": "UTC time the row was produced",
    "retrieval_ms": "embedding + search time for this query (batch time shared equally)",
    "generation_ms": "generation time for this query (batch time shared equally)",
}


#: fields inside the list<struct> columns, for the data dictionary (``schemas/dictionary.py``)
FIELD_DOCS = {
    "retrieved": {
        "rank": "1-based rank of the hit: the [n] of the prompt's context, of citations and boxes",
        "image_id": "images.image_id of the hit",
        "source_uri": "file of the image, as in images",
        "rel_path": "path relative to its dump root, as in images",
        "city": "city of the image",
        "lat, lon": "degrees, as in images",
        "caption": "captions of the image, as in images",
        "similarity": "cosine similarity of query and image vectors",
        "score": "ranking score: the similarity (caption queries: caption_similarity), or for "
        "hybrid queries the fused score, RRF or weighted (fused with the similarity when "
        "rerank_weight > 0)",
        ", ".join(SCORE_COLUMNS): "perception scores of the image, as in images",
        "caption_similarity": "cosine similarity of the query text and the image's caption "
        "vector; null when the caption space did not find the hit",
        "spaces": "spaces whose ranking found the hit: image, caption, text (full text)",
    },
    "boxes": {
        "image_id": "image_id of the boxed photo; null = the query photo",
        "rank": "rank of the boxed hit in retrieved; null = the query photo",
        "x1, y1, x2, y2": "left, top, right, bottom as fractions 0..1 of that photo's width "
        "(x) and height (y)",
    },
}
