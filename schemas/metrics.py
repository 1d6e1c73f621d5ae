"""The metrics contract: what ``mmrag evaluate`` writes to ``out/metrics/run_date=YYYY-MM-DD/``.

Long format, one row per (eval_id, task, variant, subset, city, metric): a new metric, task or
search variant adds rows, never columns, so analysts' queries keep working.  One Parquet file per
evaluation (``{eval_id}.parquet``); ``run_date`` lives in the partition path only (Hive style).

The file's key-value metadata carries ``mmrag.schema_version``; a change to this schema bumps
it, and readers keep accepting older versions.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1"
METRICS_DIR = "metrics"
TASKS = ("text2image", "image2image", "hybrid", "ann_vs_exact", "answers")

METRICS_SCHEMA = pa.schema(
    [
        ("eval_id", pa.string()),
        ("task", pa.string()),
        ("variant", pa.string()),
        ("subset", pa.string()),
        ("city", pa.string()),
        ("metric", pa.string()),
        ("value", pa.float64()),
        ("n_queries", pa.int64()),
        ("search_opts", pa.string()),
        ("sample", pa.int64()),
        ("seed", pa.int64()),
        ("answers_run_id", pa.string()),
        ("db", pa.string()),
        ("images_table", pa.string()),
        ("table_version", pa.int64()),
        ("clip_model", pa.string()),
        ("created_at", pa.timestamp("us", tz="UTC")),
    ],
    metadata={"mmrag.schema_version": SCHEMA_VERSION, "mmrag.table": "metrics"},
)

COLUMN_DOCS = {
    "eval_id": "evaluation run that wrote the row (re-running an eval_id replaces its file)",
    "task": "text2image | image2image | hybrid | hybrid_image | ann_vs_exact | answers",
    "variant": "named search options the queries ran with (null for answers: no search ran)",
    "subset": "slice of the task's queries: augmentation (image2image, hybrid_image), ANN "
              "index type "
              "(ann_vs_exact: e.g. IvfSq, or no_index), error stage (answers error_rate); "
              "null = all",
    "city": "city of the query's source image (answers clip_score: of the retrieved image); "
            "null = all cities",
    "metric": "recall@1|5|10, mrr, errors (retrieval); cites_only_retrieved, no_citation, "
              "empty_answer, too_long_answer, error_rate, clip_score, clip_score_missing (answers)",
    "value": "the metric's value (shares and recalls in 0..1, errors a count)",
    "n_queries": "queries (or answers, or query-image pairs for clip_score) behind the value",
    "search_opts": "JSON of the variant's search options passed to search_all",
    "sample": "images drawn from the images table for the labelled set",
    "seed": "seed of the sample and of the augmentations",
    "answers_run_id": "answers run checked (task answers)",
    "db": "LanceDB URI searched",
    "images_table": "table searched",
    "table_version": "images table version searched (the answers run's for task answers)",
    "clip_model": "CLIP model of query and image vectors",
    "created_at": "UTC time the evaluation wrote the file",
}

METRIC_DOCS = {
    "recall@k": "share of queries with at least one relevant image among the first k results "
                "(ann_vs_exact: share of the exact top k that the ANN top k also returns)",
    "mrr": "mean over queries of 1/rank of the first relevant result within the top 10 "
           "(0 when none)",
    "errors": "queries that could not be run (unreadable source image, failed search); "
              "excluded from the other metrics; n_queries = queries attempted",
    "cites_only_retrieved": "share of non-empty answers whose every [n] citation is a retrieved "
                            "item (1..number retrieved); an answer citing nothing counts as "
                            "citing only retrieved items",
    "no_citation": "share of non-empty answers citing no item at all",
    "empty_answer": "share of generated answers that are empty or whitespace",
    "too_long_answer": "share of non-empty answers longer than --max-answer-chars characters",
    "error_rate": "share of answer rows with an error at that stage (subset: query | retrieve | "
                  "generate)",
    "clip_score": "mean CLIP cosine between the query text and each retrieved image, "
                  "re-embedded from its file",
    "clip_score_missing": "query-image pairs without a score: image no longer in the images "
                          "table or its file unreadable",
}
