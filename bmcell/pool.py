"""The unlabelled pool, shared by every round of every experiment in a database.

A round takes a cell out of the pool by making it 'pending' for a review task. The
pool is read long before (a selection predicts its sample first), so another round
may have taken some of the cells since: :func:`take_unlabelled` is the one place a
cell changes hands.
"""

from __future__ import annotations

import psycopg


def take_unlabelled(conn: psycopg.Connection, cell_ids: list[int]) -> list[int]:
    """Mark those of ``cell_ids`` that are still unlabelled 'pending'; return them.

    Row locks, taken in id order (no deadlock between two takers), make a concurrent
    taker wait for this transaction and then see the cell pending: no two rounds ever
    take the same cell. Call it in the transaction that creates the cells' tasks.
    """
    if not cell_ids:
        return []
    rows = conn.execute(
        "SELECT id FROM cells WHERE id = ANY(%s) AND status = 'unlabelled' ORDER BY id FOR UPDATE",
        (list(cell_ids),),
    ).fetchall()
    free = [r["id"] if isinstance(r, dict) else r[0] for r in rows]
    conn.execute("UPDATE cells SET status = 'pending' WHERE id = ANY(%s)", (free,))
    return free
