"""Read an Amazon-2023 reviews file into integer columns with one engine (a child of bench_preprocess.py).

``python bench/read_engines.py ENGINE REVIEWS.jsonl [--threads 1] [--memory_limit 512MB]``

The part an engine could take over from the source stage: parse every line, keep ``user_id``,
``parent_asin`` and ``timestamp``, and turn the raw ids into dense integer codes, ending with
numpy columns in memory (what ``build_dataset`` consumes). Engines:

* ``python``: the stage's own reader (``preprocess.amazon18.read_reviews``, orjson per line, codes
  on first sight), with file:line reporting of bad lines;
* ``duckdb``: ``read_json`` with the three columns typed, ``dense_rank`` codes, ``fetchnumpy``;
  ``--memory_limit`` caps its buffer pool (it spills to ``--temp_dir``); bad lines are skipped
  without their line numbers (``ignore_errors``);
* ``polars``: ``scan_ndjson`` with a schema, dense ``rank`` codes, the streaming engine.

Prints one JSON line ``{"engine", "rows", "users", "items"}``; the parent measures time and memory.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def read_python(path: str) -> dict:
    sys.path.insert(0, str(ROOT))
    from preprocess.amazon18 import read_reviews
    from preprocess.amazon23 import AMAZON23

    log, _, _ = read_reviews(path, fmt=AMAZON23)
    u, i, t = log.arrays()
    return {"rows": len(t), "users": len(log.user_codes), "items": len(log.item_codes)}


def read_duckdb(path: str, threads: int, memory_limit: str, temp_dir: str) -> dict:
    import duckdb

    con = duckdb.connect(config={"threads": threads, "memory_limit": memory_limit, "temp_directory": temp_dir})
    con.execute("CREATE TEMP TABLE ev AS SELECT user_id, parent_asin, \"timestamp\" AS ts FROM read_json(?, "
                "format='newline_delimited', columns={'user_id': 'VARCHAR', 'parent_asin': 'VARCHAR', "
                "'timestamp': 'BIGINT'}, ignore_errors=true)", [path])
    cols = con.execute("SELECT (dense_rank() OVER (ORDER BY user_id) - 1)::INTEGER AS u, "
                       "(dense_rank() OVER (ORDER BY parent_asin) - 1)::INTEGER AS i, ts FROM ev").fetchnumpy()
    return {"rows": len(cols["ts"]), "users": int(cols["u"].max()) + 1, "items": int(cols["i"].max()) + 1}


def read_polars(path: str) -> dict:
    import polars as pl

    schema = {"user_id": pl.String, "parent_asin": pl.String, "timestamp": pl.Int64}
    df = (pl.scan_ndjson(path, schema=schema, ignore_errors=True)
          .select(pl.col("user_id").rank("dense").cast(pl.Int32) - 1, pl.col("parent_asin").rank("dense").cast(pl.Int32) - 1,
                  pl.col("timestamp"))
          .collect(engine="streaming"))
    u, i, _ = (df.get_column(c).to_numpy() for c in df.columns)
    return {"rows": df.height, "users": int(u.max()) + 1, "items": int(i.max()) + 1}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("engine", choices=["python", "duckdb", "polars"])
    p.add_argument("reviews", help="an Amazon-2023 reviews .jsonl file")
    p.add_argument("--threads", type=int, default=1, help="engine threads (duckdb; polars: POLARS_MAX_THREADS)")
    p.add_argument("--memory_limit", default="512MB", help="duckdb buffer pool limit")
    p.add_argument("--temp_dir", default=None, help="duckdb spill folder (default: beside the reviews file)")
    a = p.parse_args(argv)
    if a.engine == "python":
        out = read_python(a.reviews)
    elif a.engine == "duckdb":
        tmp = a.temp_dir or os.path.join(os.path.dirname(os.path.abspath(a.reviews)), ".duckdb_tmp")
        out = read_duckdb(a.reviews, a.threads, a.memory_limit, tmp)
    else:
        out = read_polars(a.reviews)
    print(json.dumps({"engine": a.engine, **out}))


if __name__ == "__main__":
    main()
