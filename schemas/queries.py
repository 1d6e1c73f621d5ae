"""The queries-file contract (CSV, JSONL or Parquet) and the validated query plan.

Input columns (all optional except that a row needs ``text`` or ``image``)::

    query_id  text  image  mode (text|image|caption|hybrid)  top_k  city
    min_livelier max_livelier … min_wealthier max_wealthier

``mode`` is inferred when absent: text only → ``text`` (text→image), image only → ``image``
(image→image), both → ``hybrid`` (the image-space vector, the text in the caption space and
full-text on captions, fused; ``MMRAG_HYBRID_SPACES``).  An explicit ``hybrid`` with text only
uses the text's vector in the image space; ``caption`` searches the caption vectors only.
"""

from __future__ import annotations

import pyarrow as pa

from schemas.tables import SCORE_COLUMNS

MODES = ("text", "image", "caption", "hybrid")
BOUND_COLUMNS = tuple(f"{side}_{c}" for c in SCORE_COLUMNS for side in ("min", "max"))
INPUT_COLUMNS = ("query_id", "text", "image", "mode", "top_k", "city", *BOUND_COLUMNS)
QUERY_FORMATS = ("csv", "jsonl", "json", "parquet")

#: one row per input row, validated; ``error`` set means the row is not searched
QUERY_PLAN_SCHEMA = pa.schema(
    [
        ("row", pa.int64()),
        ("query_id", pa.string()),
        ("text", pa.string()),
        ("image", pa.string()),
        ("image_path", pa.string()),
        ("mode", pa.string()),
        ("top_k", pa.int32()),
        ("city", pa.string()),
        *[(c, pa.float32()) for c in BOUND_COLUMNS],
        ("where", pa.string()),
        ("error", pa.string()),
    ]
)
