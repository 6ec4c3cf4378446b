"""Classify crops through Triton, and predict a pool of stored cells in bulk.

Stored cells are read as their thumbs (``bmcell.thumbs``: the network's input as
uint8, kept in Postgres beside the cell), not as PNG crops from object storage:
one query per group of cells instead of a GET and a decode per cell.

Pool prediction overlaps its three kinds of work: the next group's thumbs are read
while Triton runs the current group's batches (several requests in flight, one per
backend instance), and each finished group is written with one multi-row
statement. Cells that already have a prediction from the same version are skipped,
so a rerun (or a resumed run after a crash) costs little and never duplicates a row.

Calibration: a version published with a temperature (``metrics.calibration``) has its
probabilities temperature scaled here, before they are returned or stored
(``bmcell.calibration.apply``: softmax(log p / T) equals softmax(logits / T)), unless
``BMCELL_CALIBRATE`` is false. The selector reads the stored predictions, so its
CST threshold and AL margin see calibrated probabilities.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from bmcell import calibration, images, preprocess, thumbs
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
    calibrated: bool = False


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
        io_threads: int = 4,
        in_flight: int = 2,
        calibrate: bool = True,
    ) -> None:
        self.calibrate = calibrate
        self.db = db
        self.store = store
        self.triton = triton
        self.serving = serving
        self.batch_size = batch_size
        self.limits = limits
        self.max_pool_cells = max_pool_cells
        self.in_flight = in_flight
        self.pool = ThreadPoolExecutor(io_threads, thread_name_prefix="thumbs")
        self.triton_pool = ThreadPoolExecutor(in_flight, thread_name_prefix="triton")

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.triton_pool.shutdown(wait=False, cancel_futures=True)

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
        return row, self._calibrated(row, self._run_batches(row["version"], batch))

    def temperature(self, row: dict) -> float | None:
        """The temperature this classifier applies for ``row``'s version (None: raw)."""
        return calibration.temperature_of(row) if self.calibrate else None

    def _calibrated(self, row: dict, probs: np.ndarray) -> np.ndarray:
        return calibration.apply(probs, self.temperature(row))

    def classify_cells(
        self, cell_ids: list[int], version: int, sees_lab: Callable[[int], bool]
    ) -> tuple[dict, np.ndarray]:
        """Cells of labs the caller does not see are reported missing, like unknown ids
        (checked first, so the answer says nothing about models either)."""
        self._check_visible(cell_ids, sees_lab)
        row = self.serving.resolve(version)
        pixels = thumbs.fetch(self.db, self.store, cell_ids, row["input_size"])
        return row, self._calibrated(
            row, self._run_batches(row["version"], thumbs.to_batch(pixels))
        )

    def _run_batches(self, version: int, batch: np.ndarray) -> np.ndarray:
        out = [
            self._infer(version, batch[i : i + self.batch_size])
            for i in range(0, len(batch), self.batch_size)
        ]
        return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

    def _check_visible(self, cell_ids: list[int], sees_lab: Callable[[int], bool]) -> None:
        with self.db.connection() as conn:
            rows = conn.execute(
                "SELECT id, lab_id FROM cells WHERE id = ANY(%s)", (cell_ids,)
            ).fetchall()
        visible = {r["id"] for r in rows if sees_lab(r["lab_id"])}
        missing = sorted(set(cell_ids) - visible)
        if missing:
            raise NotFound(
                f"no cells with ids {missing[:10]}" + (" ..." if len(missing) > 10 else ""),
                field="cell_ids",
            )

    def predict_pool(
        self, cell_ids: list[int], version: int, batch_size: int = 0
    ) -> Iterator[Progress]:
        row = self.serving.resolve(version)
        version, size = row["version"], row["input_size"]
        self.serving.ensure_loaded(version)
        cal = self.temperature(row) is not None
        bs = batch_size or self.batch_size
        unique = list(dict.fromkeys(cell_ids))
        todo = self._not_predicted(unique, version)
        total, done, written = len(unique), len(unique) - len(todo), 0
        yield Progress(done, total, written, version, calibrated=cal)

        # Groups of cells move through three stages at once: the next group's thumbs
        # are read (one query) on the I/O pool while the current group's batches queue
        # on the Triton pool (``in_flight`` requests at a time, so every backend
        # instance stays busy), and this thread writes the group before (one
        # statement) and reports it.
        group = bs * max(2, self.in_flight)
        groups = [todo[i : i + group] for i in range(0, len(todo), group)]
        pending: deque[tuple[list[int], list[Future]]] = deque()
        try:
            fetched = self.pool.submit(self._thumbs, groups[0], size) if groups else None
            for i, cells in enumerate(groups):
                pixels = fetched.result()
                if i + 1 < len(groups):
                    fetched = self.pool.submit(self._thumbs, groups[i + 1], size)
                batches = [
                    self.triton_pool.submit(self._infer_pixels, version, pixels[j : j + bs])
                    for j in range(0, len(cells), bs)
                ]
                pending.append((cells, batches))
                last = i + 1 == len(groups)
                while len(pending) > 1 or (last and pending):
                    cells_done, probs = self._collect(pending.popleft())
                    probs = self._calibrated(row, probs)
                    written += self._write(cells_done, version, probs)
                    done += len(cells_done)
                    yield Progress(done, total, written, version, calibrated=cal)
        finally:  # also when the caller went away: drop the batches not started yet
            for _, batches in pending:
                for f in batches:
                    f.cancel()
        yield Progress(done, total, written, version, finished=True, calibrated=cal)

    def _not_predicted(self, cell_ids: list[int], version: int) -> list[int]:
        """``cell_ids`` without a prediction of ``version`` yet, in order; every id must
        be a cell (checked before any work, so a bad id writes nothing)."""
        if len(cell_ids) > self.max_pool_cells:
            raise InvalidArgument(
                f"{len(cell_ids)} cells, the limit is {self.max_pool_cells} per call "
                "(BMCELL_MAX_POOL_CELLS)",
                field="cell_ids",
            )
        with self.db.connection() as conn:
            rows = conn.execute(
                """SELECT c.id, p.cell_id IS NOT NULL AS done FROM cells c
                     LEFT JOIN predictions p ON p.cell_id = c.id AND p.model_name = %s
                                            AND p.model_version = %s
                    WHERE c.id = ANY(%s)""",
                (self.serving.model_name, version, cell_ids),
            ).fetchall()
        done = {r["id"]: r["done"] for r in rows}
        missing = [c for c in cell_ids if c not in done]
        if missing:
            raise NotFound(
                f"no cells with ids {missing[:10]}" + (" ..." if len(missing) > 10 else ""),
                field="cell_ids",
            )
        return [c for c in cell_ids if not done[c]]

    def _thumbs(self, cell_ids: list[int], size: int) -> np.ndarray:
        return thumbs.fetch(self.db, self.store, cell_ids, size)

    def _infer_pixels(self, version: int, pixels: np.ndarray) -> np.ndarray:
        return self._infer(version, thumbs.to_batch(pixels))

    @staticmethod
    def _collect(item: tuple[list[int], list[Future]]) -> tuple[list[int], np.ndarray]:
        cells, batches = item
        return cells, np.concatenate([f.result() for f in batches])

    def _write(self, cell_ids: list[int], version: int, probs: np.ndarray) -> int:
        """Store one group's predictions with one statement; returns the rows written
        (a row another caller wrote meanwhile is kept, not duplicated)."""
        probs = probs.astype(np.float32, copy=False)
        top = np.argsort(-probs, axis=1)[:, :2]
        rows = np.arange(len(probs))
        p1 = np.minimum(probs[rows, top[:, 0]], 1.0)
        margin = np.clip(probs[rows, top[:, 0]] - probs[rows, top[:, 1]], 0.0, 1.0)
        # real[] per row as its text form: unnest() of a 2-D array would flatten it.
        vectors = ["{" + ",".join(map(repr, p.tolist())) + "}" for p in probs]
        with self.db.transaction() as conn:
            cur = conn.execute(
                """INSERT INTO predictions (cell_id, model_name, model_version, probabilities,
                                            top1, p1, margin)
                   SELECT u.cell_id, %s, %s, u.probabilities::real[], u.top1, u.p1, u.margin
                     FROM unnest(%s::bigint[], %s::text[], %s::smallint[], %s::real[],
                                 %s::real[]) AS u(cell_id, probabilities, top1, p1, margin)
                   ON CONFLICT (cell_id, model_name, model_version) DO NOTHING""",
                (
                    self.serving.model_name,
                    version,
                    [int(c) for c in cell_ids],
                    vectors,
                    top[:, 0].tolist(),
                    p1.tolist(),
                    margin.tolist(),
                ),
            )
            return cur.rowcount
