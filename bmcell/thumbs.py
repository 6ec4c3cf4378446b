"""Every cell's crop at the network's input size, kept in Postgres as uint8.

Prediction, training and evaluation all need the same small tensor per cell. Making
it from the stored 282 px PNG costs an object-storage GET and a decode every time
(about 6 ms a cell, and the embedded S3 server serialises requests), which bounded
pool prediction at ~15 cells/s. So the segmenter stores the crop's network input
(``preprocess.crop_to_uint8``, 12 KiB at 64 px) beside the cell, in the transaction
that inserts the cell, and readers fetch a batch of them in one query. The float
tensor is made from these bytes by ``preprocess.uint8_to_batch``, the same numbers
``preprocess.crop_to_tensor`` gives from the PNG.

A thumb is a cache of the crop: any size missing (another input size, or cells
stored before migration 0014) is computed from the crop and stored on first read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psycopg

from bmcell import log, preprocess
from bmcell.db import Database
from bmcell.errors import NotFound
from bmcell.storage import ObjectStore

_LOG = log.get(__name__)


def encode(pixels: np.ndarray) -> bytes:
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"a thumb is uint8 (S, S, 3), got {pixels.dtype} {pixels.shape}")
    return np.ascontiguousarray(pixels).tobytes()


def decode(data: bytes, size: int) -> np.ndarray:
    return np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)


def write_for_field(
    conn: psycopg.Connection, field_id: int, crops: Iterable[tuple[int, np.ndarray]], size: int
) -> None:
    """Store the thumbs of a field's cells, given ``(index_in_field, crop RGB)`` pairs.

    Runs in the caller's transaction, so cells and their thumbs commit together.
    """
    rows = [
        (size, encode(preprocess.crop_to_uint8(crop, size)), field_id, index)
        for index, crop in crops
    ]
    if not rows:
        return
    with conn.cursor() as cur:
        cur.executemany(
            """INSERT INTO cell_thumbs (cell_id, size, pixels)
               SELECT id, %s, %s FROM cells WHERE field_id = %s AND index_in_field = %s
               ON CONFLICT (cell_id, size) DO NOTHING""",
            rows,
        )


def fetch(
    db: Database,
    store: ObjectStore,
    cell_ids: Sequence[int],
    size: int,
    *,
    io_threads: int = 8,
) -> np.ndarray:
    """The thumbs of ``cell_ids`` in that order, uint8 (N, size, size, 3).

    One query for the stored ones; the rest are made from their crops in object
    storage (on ``io_threads`` threads) and stored for next time. Unknown cell ids
    raise ``NotFound`` naming them.
    """
    out = np.empty((len(cell_ids), size, size, 3), dtype=np.uint8)
    if not cell_ids:
        return out
    unique = list(dict.fromkeys(int(c) for c in cell_ids))
    with db.connection() as conn:
        rows = conn.execute(
            """SELECT c.id, c.crop_key, t.pixels FROM cells c
                 LEFT JOIN cell_thumbs t ON t.cell_id = c.id AND t.size = %s
                WHERE c.id = ANY(%s)""",
            (size, unique),
        ).fetchall()
    found = {r["id"]: r for r in rows}
    missing = [c for c in unique if c not in found]
    if missing:
        raise NotFound(
            f"no cells with ids {missing[:10]}" + (" ..." if len(missing) > 10 else ""),
            field="cell_ids",
        )
    pixels = {cid: decode(r["pixels"], size) for cid, r in found.items() if r["pixels"] is not None}
    todo = [cid for cid in unique if cid not in pixels]
    if todo:
        pixels.update(
            _fill(db, store, [(cid, found[cid]["crop_key"]) for cid in todo], size, io_threads)
        )
    for i, cid in enumerate(cell_ids):
        out[i] = pixels[int(cid)]
    return out


def _fill(
    db: Database, store: ObjectStore, keys: list[tuple[int, str]], size: int, io_threads: int
) -> dict[int, np.ndarray]:
    def make(item: tuple[int, str]) -> tuple[int, np.ndarray]:
        cid, key = item
        return cid, preprocess.crop_to_uint8(store.get(key), size)

    with ThreadPoolExecutor(max(1, min(io_threads, len(keys)))) as pool:
        made = dict(pool.map(make, keys))
    with db.transaction() as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO cell_thumbs (cell_id, size, pixels) VALUES (%s, %s, %s) "
            "ON CONFLICT (cell_id, size) DO NOTHING",
            [(cid, size, encode(p)) for cid, p in made.items()],
        )
    _LOG.info("thumbs made from crops", cells=len(made), size=size)
    return made


def to_batch(pixels: np.ndarray) -> np.ndarray:
    """uint8 (N, S, S, 3) thumbs to the network's float32 (N, 3, S, S) input."""
    return preprocess.uint8_to_batch(pixels)
