"""The dump-side contract: Place Pulse ``metadata.json`` keys and the file-name pattern.

``metadata.json`` is a list of objects such as::

    {"Image Name": "40.71_-74.00_50f4…_New York.JPG",
     "Relative Path": "images\\\\New York\\\\40.71_-74.00_50f4…_New York.JPG",
     "Caption": ["a busy street …"], "livelier": "5.1", "more beautiful": "4.2", …}

The same columns may come as ``metadata.csv`` or ``metadata.parquet``.  Keys are matched
case-insensitively, with spaces, dashes and underscores treated alike.
"""

from __future__ import annotations

import re
from functools import lru_cache

from schemas.tables import SCORE_COLUMNS

METADATA_FILES = ("metadata.json", "metadata.csv", "metadata.parquet")

#: normalised key → images column
KEY_TO_COLUMN: dict[str, str] = {
    "image_name": "image_name",
    "relative_path": "rel_path",
    "caption": "caption",
    "captions": "caption",
    "city": "city",
    "lat": "lat",
    "latitude": "lat",
    "lon": "lon",
    "long": "lon",
    "lng": "lon",
    "longitude": "lon",
    "place_id": "place_id",
    "placeid": "place_id",
    **{c: c for c in SCORE_COLUMNS},
}

#: Place Pulse score keys as published ("more beautiful") → column ("more_beautiful")
SCORE_KEYS = {c.replace("_", " "): c for c in SCORE_COLUMNS}

#: ``{lat}_{lon}_{placeid}_{City}.JPG``
FILE_NAME_PATTERN = re.compile(
    r"^(?P<lat>-?\d{1,3}(?:\.\d+)?)_(?P<lon>-?\d{1,3}(?:\.\d+)?)_(?P<place_id>[0-9A-Za-z]+)_"
    r"(?P<city>[^/\\]+?)\.(?:jpe?g|png|webp)$",
    re.IGNORECASE,
)



@lru_cache(maxsize=4096)
def normalise_key(key: str) -> str:
    return re.sub(r"[\s\-_]+", "_", str(key).strip().lower())
