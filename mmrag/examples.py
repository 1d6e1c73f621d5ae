"""The analysts' view of a run, with Polars: ``python -m mmrag.examples DB OUT``.

Used at the end of ``make demo``; tested queries of the same kind are in
docs/reference/outputs.md.
"""

from __future__ import annotations

import sys

import lancedb
import polars as pl


def answers(out: str) -> pl.LazyFrame:
    """Every run, whatever its schema version (older files read with nulls)."""
    from tasks.io.answers import read_answers

    return read_answers(out)


def safer_by_city(out: str) -> pl.DataFrame:
    """Average ``safer`` score of the images retrieved, per city."""
    hits = answers(out).select("query_id", "retrieved").explode("retrieved").unnest("retrieved")
    return (hits.drop_nulls("image_id").group_by("city")
            .agg(pl.col("safer").mean().round(2).alias("mean_safer"), pl.len().alias("hits"))
            .sort("hits", descending=True).collect())


def images_per_city(db: str) -> pl.DataFrame:
    images = lancedb.connect(db).open_table("images").to_polars()
    return images.group_by("city").len().sort("len", "city", descending=[True, False]).collect()


def main(db: str, out: str) -> None:
    """Three small tables that fit on one screen together."""
    pl.Config.set_tbl_rows(8)
    pl.Config.set_tbl_hide_column_data_types(True)
    pl.Config.set_tbl_hide_dataframe_shape(True)
    pl.Config.set_fmt_str_lengths(24)
    pl.Config.set_tbl_width_chars(120)
    print(f"images per city (top 5):\n{images_per_city(db).head(5)}")
    rows = answers(out).select("run_date", "query_id", "mode", "table_version",
                               pl.col("retrieved").list.len().alias("hits"),
                               pl.col("answer").str.slice(0, 24), "error").collect()
    print(f"answers:\n{rows}")
    print(f"mean safer score of retrieved images per city (top 5):\n{safer_by_city(out).head(5)}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
