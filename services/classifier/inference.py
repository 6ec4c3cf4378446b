"""Classify crops through Triton, and predict a pool of stored cells in bulk.

Pool prediction overlaps its three kinds of work: crops are fetched from object
storage and preprocessed by a thread pool while Triton runs the previous batch, and
predictions are written with one multi-row statement per batch. Cells that already
have a prediction from the same version are skipped, so a rerun (or a resumed run
after a crash) costs little and never duplicates a row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bmcell import images, preprocess
from bmcell.db import Database
from bmcell.errors import InvalidArgument, NotFound
from bmcell.storage import ObjectStore
from services.classifier.serving import ModelServing
from services.classifier.triton_client import ModelNotLoaded, Triton


@dataclass(frozen=True)
class Progress:
    done: int
    total: int
    written: int
    model_version: int
    finished: bool = False


class Inference:
    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        triton: Triton,
        serving: ModelServing,
        batch_size: int,
        limits: images.Limits,
        *,
        max_pool_cells: int = 1_000_000,
        io_threads: int = 8,
    ) -> None:
        self.db = db
        self.store = store
        self.triton = triton
        self.serving = serving
        self.batch_size = batch_size
        self.limits = limits
        self.max_pool_cells = max_pool_cells
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="crops")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _infer(self, version: int, batch: np.ndarray) -> np.ndarray:
        try:
            return self.triton.infer(self.serving.model_name, version, batch)
        except ModelNotLoaded:
            # Triton restarted or never loaded this version: load it, then try once more.
            self.serving.ensure_loaded(version)
            return self.triton.infer(self.serving.model_name, version, batch)

    def classify_images(self, crops: list[bytes], version: int) -> tuple[dict, np.ndarray]:
        # A client's bytes: decoded by the bounded decoder before anything else sees them.
        decoded = [
            images.decode_rgb(c, self.limits, field=f"images[{i}]").rgb for i, c in enumerate(crops)
        ]
        row = self.serving.resolve(version)
        try:
            batch = preprocess.batch_from_crops(decoded, row["input_size"])
        except ValueError as exc:
            raise InvalidArgument(str(exc), field="images") from exc
        return row, self._run_batches(row["version"], batch)

    def classify_cells(
        self, cell_ids: list[int], version: int, sees_lab: Callable[[int], bool]
    ) -> tuple[dict, np.ndarray]:
        """Cells of labs the caller does not see are reported missing, like unknown ids
        (checked first, so the answer says nothing about models either)."""
        keys = self._crop_keys(cell_ids, sees_lab)
        row = self.serving.resolve(version)
        crops = list(self.pool.map(self.store.get, [keys[c] for c in cell_ids]))
        batch = preprocess.batch_from_crops(crops, row["input_size"])
        return row, self._run_batches(row["version"], batch)

    def _run_batches(self, version: int, batch: np.ndarray) -> np.ndarray:
        out = [
            self._infer(version, batch[i : i + self.batch_size])
            for i in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _crop_keys(
        self, cell_ids: list[int], sees_lab: Callable[[int], bool] = lambda _lab: True
    ) -> dict[int, str]:
        if len(cell_ids) > self.max_pool_cells:
            raise InvalidArgument(
                f"{len(cell_ids)} cells, the limit is {self.max_pool_cells} per call "
                "(BMCELL_MAX_POOL_CELLS)",
                field="cell_ids",
            )
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT id, crop_key, lab_id FROM cells WHERE id = ANY(%s)", (cell_ids,)
            ).fetchall()
        keys = {r["id"]: r["crop_key"] for r in rows if sees_lab(r["lab_id"])}
        missing = sorted(set(cell_ids) - set(keys))
        if missing:
            raise NotFound(
                f"no cells with ids {missing[:10]}" + (" ..." if len(missing) > 10 else ""),
                field="cell_ids",
            )
        return keys

    def predict_pool(
        self, cell_ids: list[int], version: int, batch_size: int = 0
    ) -> Iterator[Progress]:
        row = self.serving.resolve(version)
        version, size = row["version"], row["input_size"]
        self.serving.ensure_loaded(version)
        bs = batch_size or self.batch_size
        unique = list(dict.fromkeys(cell_ids))
        keys = self._crop_keys(unique)
        with self.db.connection() as conn:
            done_rows = conn.execute(
                "SELECT cell_id FROM predictions WHERE cell_id = ANY(%s) AND model_name = %s "
                "AND model_version = %s",
                (unique, self.serving.model_name, version),
            ).fetchall()
        already = {r["cell_id"] for r in done_rows}
        todo = [c for c in unique if c not in already]
        total, done, written = len(unique), len(already), 0
        yield Progress(done, total, written, version)

        def load(chunk: list[int]) -> np.ndarray:
            return np.stack(
                [preprocess.crop_to_tensor(self.store.get(keys[c]), size) for c in chunk]
            )

        chunks = [todo[i : i + bs] for i in range(0, len(todo), bs)]

        # Per chunk, its crops load on the thread pool (one task per 8 cells) while
        # Triton runs the chunk before it.
        def submit(chunk: list[int]):
            parts = [chunk[i : i + 8] for i in range(0, len(chunk), 8)]
            return [self.pool.submit(load, p) for p in parts]

        pending = submit(chunks[0]) if chunks else None
        for i, chunk in enumerate(chunks):
            batch = np.concatenate([f.result() for f in pending])
            pending = submit(chunks[i + 1]) if i + 1 < len(chunks) else None
            probs = self._infer(version, batch)
            written += self._write(chunk, version, probs)
            done += len(chunk)
            yield Progress(done, total, written, version)
        yield Progress(done, total, written, version, finished=True)

    def _write(self, cell_ids: list[int], version: int, probs: np.ndarray) -> int:
        top = np.argsort(-probs, axis=1)[:, :2]
        p1 = probs[np.arange(len(probs)), top[:, 0]]
        p2 = probs[np.arange(len(probs)), top[:, 1]]
        margin = np.clip(p1 - p2, 0.0, 1.0)
        rows = [
            (
                cid,
                self.serving.model_name,
                version,
                probs[i].tolist(),
                int(top[i, 0]),
                float(min(p1[i], 1.0)),
                float(margin[i]),
            )
            for i, cid in enumerate(cell_ids)
        ]
        with self.db.transaction() as conn, conn.cursor() as cur:
            cur.executemany(
                """INSERT INTO predictions (cell_id, model_name, model_version, probabilities,
                                            top1, p1, margin)
                   VALUES (%s, %s, %s, %s, %s, %s, %s)
                   ON CONFLICT (cell_id, model_name, model_version) DO NOTHING""",
                rows,
            )
        return len(rows)
