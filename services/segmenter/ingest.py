"""One field image upload: check, segment, store objects, then rows in one transaction.

Content-addressed on the sha256 of the uploaded bytes, within a lab. The same bytes
sent twice to one lab, even at the same moment and to different replicas, end as one
field: a Postgres advisory lock keyed by lab and digest serialises them (the second
waits, then finds the first's row and answers duplicate), and ``UNIQUE (lab_id,
sha256)`` with ``INSERT ... ON CONFLICT DO NOTHING`` stays the last word should a lock
be lost. The same bytes sent to another lab are that lab's own field, with its own
cells: a lab never learns from an upload that another lab holds the image.

Objects are shared (their keys are content addresses: the same field in two labs,
the same crop cut from two different files of one field), so writing each object,
the rows that use it and, on failure, deleting the ones this call created, happen
under a lock keyed by that object's own digest (:func:`bmcell.db.object_lock_key`,
one per field image, crop and mask, taken together in one order): a failing upload
never deletes an object that another upload has just found and used, and ``bmcell
storage check --repair`` takes the same locks before it deletes an orphan.
Segmentation runs outside them, so uploads wait on each other only for that write.

A duplicate is checked too: when the stored field image, a crop or a mask of the
field is gone (object storage lost it, or someone deleted it), the upload writes it
again from the bytes just received (crops and masks are cut again by
:mod:`services.segmenter.restore` and must match their content address), so sending
the file once more repairs the field.

The caller is authenticated by the server; :func:`bmcell.auth.require_upload`
decides here, from the header's lab, before a byte of the image is read, and the
field records who uploaded it (``field_images.uploaded_by``, and the ``field.upload``
audit row written with the rows).

Failure leaves nothing behind: objects are written first under content keys, every
row (lab, specimen, field, cells) in one transaction after; if anything fails,
the objects this call created are deleted before the error goes back.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Histogram
from psycopg import Connection

from bmcell import audit, log, specimens, thumbs
from bmcell.auth import Principal, require_upload
from bmcell.db import Database, advisory_locks, lock_key, object_lock_key
from bmcell.errors import BmcellError, FailedPrecondition, InvalidArgument
from bmcell.images import Decoded
from bmcell.network import DEFAULT_INPUT_SIZE
from bmcell.settings import SegmenterSettings
from bmcell.storage import ObjectStore, content_key, digest_of_key, sha256_hex
from services.segmenter import cells as repo
from services.segmenter import images, instances, restore
from services.segmenter.models import ModelHolder
from services.segmenter.workers import SegmentPool

_LOG = log.get(__name__)
_CODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_WRITERS = 4  # object writes in flight, shared by every upload of the service

UPLOADS = Counter("bmcell_segmenter_uploads_total", "Field uploads by outcome", ["outcome"])
UPLOAD_BYTES = Counter("bmcell_segmenter_upload_bytes_total", "Bytes received in uploads")
CELLS_PER_FIELD = Histogram(
    "bmcell_segmenter_cells_per_field",
    "Cells found per newly segmented field",
    buckets=(0, 1, 2, 4, 6, 8, 10, 12, 16, 20, 30, 50, 100),
)
RESTORED_OBJECTS = Counter(
    "bmcell_segmenter_restored_objects_total",
    "Lost field images, crops and masks written again by a duplicate upload",
)
SEGMENTATION_SECONDS = Histogram(
    "bmcell_segmenter_segmentation_seconds",
    "Network, instance separation, morphometrics and crops for one field",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)


@dataclass(frozen=True)
class UploadHeader:
    lab: str
    specimen: str
    diagnosis: str = ""
    filename: str = ""
    sha256: str = ""
    # A new specimen's role (empty: training); for an existing one it must match.
    role: str = ""
    # The field's scale, when the uploader knows it (field_images.um_per_px).
    um_per_px: float | None = None


@dataclass(frozen=True)
class UploadResult:
    field_id: int
    sha256: str
    duplicate: bool
    cells: int
    border_cells: int
    width: int
    height: int
    segmentation_seconds: float


def check_header(h: UploadHeader) -> None:
    for name, value in (("lab", h.lab), ("specimen", h.specimen)):
        if not _CODE.match(value):
            raise InvalidArgument(
                f"{value!r} is not a code (letters, digits, '.', '_', '-'; up to 63)",
                field=name,
            )
    if len(h.diagnosis) > 100:
        raise InvalidArgument("longer than 100 characters", field="diagnosis")
    if len(h.filename) > 255:
        raise InvalidArgument("longer than 255 characters", field="filename")
    if h.sha256 and not _HEX64.match(h.sha256.lower()):
        raise InvalidArgument("must be 64 hex digits", field="sha256")
    if h.role:
        specimens.check_role(h.role, field="header.role")
    if h.um_per_px is not None and not 0 < h.um_per_px < 100:
        raise InvalidArgument(
            f"{h.um_per_px} µm per pixel is not a scale (0 < um_per_px < 100)",
            field="header.um_per_px",
        )


def check_role_unchanged(h: UploadHeader, current: str | None) -> None:
    """An upload never changes an existing specimen's role: that is an audited,
    checked change of its own (bmcell.specimens.set_role)."""
    if h.role and current is not None and current != h.role:
        raise FailedPrecondition(
            f"specimen {h.lab}/{h.specimen} is a {current} specimen, not {h.role}; "
            f"upload with role {current} (or none), or have an operator change it with "
            f"`bmcell specimens set-role {h.lab} {h.specimen} {h.role}`",
            field="header.role",
        )


def _field_lock_key(lab: str, digest: str) -> int:
    """The lock that makes these bytes one field in this lab (by code)."""
    return lock_key("field", lab, digest)


class Ingestor:
    def __init__(
        self,
        db: Database,
        store: ObjectStore,
        settings: SegmenterSettings,
        model: ModelHolder,
        segmenter: SegmentPool | None,
    ) -> None:
        self.db = db
        self.store = store
        self.settings = settings
        self.model = model
        self.segmenter = segmenter
        self._segmenting = threading.BoundedSemaphore(settings.segment_concurrency)
        self._writers = ThreadPoolExecutor(_WRITERS, thread_name_prefix="segmenter-s3")

    def upload(
        self, header: UploadHeader, chunks: Iterable[bytes], uploader: Principal
    ) -> UploadResult:
        """Receive, check and store one field; counts every outcome."""
        try:
            result = self._upload(header, chunks, uploader)
        except BmcellError as exc:
            UPLOADS.labels(exc.grpc_code.lower()).inc()
            raise
        except Exception:
            UPLOADS.labels("error").inc()
            raise
        UPLOADS.labels("duplicate" if result.duplicate else "created").inc()
        return result

    def _upload(
        self, header: UploadHeader, chunks: Iterable[bytes], uploader: Principal
    ) -> UploadResult:
        check_header(header)
        require_upload(self.db, uploader, header.lab)
        # Refused before a byte is read; checked again in the transaction that writes.
        check_role_unchanged(header, repo.specimen_role(self.db, header.lab, header.specimen))
        data = self._receive(chunks)
        digest = sha256_hex(data)
        if header.sha256 and header.sha256.lower() != digest:
            raise InvalidArgument(
                f"truncated or altered: received {len(data)} bytes with sha256 {digest}",
                field="sha256",
            )
        # One pooled connection holds the locks and does every query of this upload, so
        # uploads never wait on each other for a second connection.
        with (
            self.db.connection() as conn,
            advisory_locks(conn, [_field_lock_key(header.lab, digest)]),
        ):
            return self._store_once(conn, header, data, digest, uploader)

    def _receive(self, chunks: Iterable[bytes]) -> bytes:
        limit = self.settings.max_upload_bytes
        parts, size = [], 0
        for chunk in chunks:
            size += len(chunk)
            UPLOAD_BYTES.inc(len(chunk))
            if size > limit:
                raise InvalidArgument(
                    f"too large: more than {limit} bytes (BMCELL_MAX_UPLOAD_BYTES)",
                    field="chunk",
                )
            parts.append(chunk)
        return b"".join(parts)

    def _existing(self, conn: Connection, lab: str, digest: str) -> UploadResult | None:
        row = repo.find_field(conn, lab, digest)
        conn.commit()
        if row is None:
            return None
        return UploadResult(
            row["id"],
            digest,
            True,
            row["cells"],
            row["border_cells"],
            row["width"],
            row["height"],
            0.0,
        )

    def _store_once(
        self,
        conn: Connection,
        header: UploadHeader,
        data: bytes,
        digest: str,
        uploader: Principal,
    ) -> UploadResult:
        found = self._existing(conn, header.lab, digest)
        if found is not None:
            self._restore_lost(conn, found.field_id, data)
            return found
        model = self.model.get()
        assert self.segmenter is not None, "a model without its segmentation workers"
        pixels = self._pixels(data)
        with self._segmenting:
            done = self.segmenter.segment(pixels.rgb, self.settings.crop_size)
        field = images.FieldImage(pixels.rgb, pixels.format, done.field_png)
        cells, seconds = done.cells, done.seconds
        SEGMENTATION_SECONDS.observe(seconds)
        encoded = [(c, crop, mask) for c, (crop, mask) in zip(cells, done.encoded, strict=True)]
        # Objects are shared with other fields: see the module doc.
        digests = [digest] + [sha256_hex(b) for _, crop, mask in encoded for b in (crop, mask)]
        with advisory_locks(conn, map(object_lock_key, digests)):
            created: list[str] = []
            writes: list[tuple[str, bytes]] = []
            try:
                field_key = self._put(content_key("fields", digest, ".png"), field.png, writes)
                cell_rows = []
                for cell, crop, mask in encoded:
                    crop_key = self._put(
                        content_key("cells", sha256_hex(crop), ".png"), crop, writes
                    )
                    mask_key = self._put(
                        content_key("cells", sha256_hex(mask), ".mask.png"), mask, writes
                    )
                    cell_rows.append(_cell_row(cell, crop_key, mask_key))
                self._write(writes, created)
                if self.settings.fault_pause_before_commit_s:
                    time.sleep(self.settings.fault_pause_before_commit_s)
                field_id = self._insert(
                    conn,
                    header,
                    data,
                    digest,
                    field,
                    field_key,
                    model.name,
                    uploader,
                    cell_rows,
                    [(c.index, c.crop) for c in cells],
                )
            except BaseException:
                self._delete(created)
                raise
            if field_id is None:  # lost a race the lock should have prevented
                self._delete(created)
        if field_id is None:
            found = self._existing(conn, header.lab, digest)
            assert found is not None
            return found
        CELLS_PER_FIELD.observe(len(cells))
        border = sum(c.touches_border for c in cells)
        _LOG.info(
            "field segmented",
            field_id=field_id,
            cells=len(cells),
            border_cells=border,
            seconds=round(seconds, 3),
            model=model.name,
            uploaded_by=uploader.name,
        )
        return UploadResult(
            field_id, digest, False, len(cells), border, field.width, field.height, seconds
        )

    def _limits(self) -> dict:
        return {
            "max_bytes": min(self.settings.max_upload_bytes, self.settings.max_image_bytes),
            "max_pixels": self.settings.max_image_pixels,
            "max_frames": self.settings.max_image_frames,
        }

    def _pixels(self, data: bytes) -> Decoded:
        return images.decode_pixels(data, **self._limits())

    def _decode(self, data: bytes) -> images.FieldImage:
        return images.decode(data, **self._limits())

    def _restore_lost(self, conn: Connection, field_id: int, data: bytes) -> None:
        """Write again what a duplicate's field lost (see the module doc)."""
        field, cells = repo.field_objects(conn, field_id)
        conn.commit()
        keys = [field["object_key"], *(k for c in cells for k in (c["crop_key"], c["mask_key"]))]
        lost = {k for k in keys if not self.store.exists(k)}
        if not lost:
            return
        image = self._decode(data)
        digests = [d for d in map(digest_of_key, lost) if d] + [field["sha256"]]
        with advisory_locks(conn, map(object_lock_key, digests)):
            lost = {k for k in lost if not self.store.exists(k)}  # another upload was first
            if field["object_key"] in lost:
                self.store.put(field["object_key"], image.png, "image/png")
            segment = restore.segmenter_of(self.store, field["segmenter"])(
                image.rgb, self.settings.crop_size
            )

            def segment_in_turn() -> list[instances.SegmentedCell]:
                with self._segmenting:  # the same bound as new fields
                    return segment()

            masks = {
                c["mask_key"]: self.store.get(c["mask_key"])
                for c in cells
                if c["crop_key"] in lost and c["mask_key"] not in lost
            }
            cut = restore.recut(
                image.rgb,
                cells,
                lost,
                crop_size=self.settings.crop_size,
                masks=masks,
                segment=segment_in_turn,
            )
            for key, png in cut.items():
                self.store.put(key, png, "image/png")
        still = sorted(lost - set(cut) - {field["object_key"]})
        RESTORED_OBJECTS.inc(len(lost) - len(still))
        _LOG.warning(
            "duplicate upload restored lost objects",
            field_id=field_id,
            restored=len(lost) - len(still),
            not_restorable=still,
        )

    @staticmethod
    def _put(key: str, data: bytes, writes: list[tuple[str, bytes]]) -> str:
        writes.append((key, data))
        return key

    def _write(self, writes: list[tuple[str, bytes]], created: list[str]) -> None:
        """Write each PNG not stored yet, ``_WRITERS`` at a time (a field's ~25 objects
        one after another wait ~50 round trips); ``created`` gets every key this call
        wrote, also when another write fails, so that the caller deletes them all."""

        def one(key: str, data: bytes) -> None:
            if not self.store.exists(key):
                self.store.put(key, data, "image/png")
                created.append(key)

        futures = [self._writers.submit(one, key, data) for key, data in writes]
        wait(futures)
        for future in futures:
            future.result()  # the first failure, once every write has ended

    def _delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                self.store.delete(key)
            except BmcellError:
                _LOG.exception("could not delete an object of a failed upload", key=key)

    def _insert(
        self,
        conn: Connection,
        header: UploadHeader,
        data: bytes,
        digest: str,
        field: images.FieldImage,
        field_key: str,
        segmenter: str,
        uploader: Principal,
        cell_rows: list[dict],
        crops: list[tuple[int, np.ndarray]],
    ) -> int | None:
        with conn.transaction():
            lab_id, specimen_id, role = repo.upsert_specimen(
                conn, header.lab, header.specimen, header.diagnosis, header.role or "training"
            )
            check_role_unchanged(header, role)
            field_id = repo.insert_field(
                conn,
                {
                    "lab_id": lab_id,
                    "specimen_id": specimen_id,
                    "sha256": digest,
                    "object_key": field_key,
                    "filename": header.filename,
                    "format": field.format,
                    "width": field.width,
                    "height": field.height,
                    "size_bytes": len(data),
                    "segmenter": segmenter,
                    "uploaded_by": uploader.user_id,
                    "um_per_px": header.um_per_px,
                },
            )
            if field_id is None:
                return None
            for row in cell_rows:
                row.update(field_id=field_id, specimen_id=specimen_id, lab_id=lab_id)
            repo.insert_cells(conn, cell_rows)
            thumbs.write_for_field(conn, field_id, crops, DEFAULT_INPUT_SIZE)
            # No filename: it often carries patient identifiers.
            audit.record(
                conn,
                "field.upload",
                "field",
                field_id,
                {"lab": header.lab, "specimen": header.specimen, "sha256": digest}
                | {"bytes": len(data), "cells": len(cell_rows), "segmenter": segmenter},
                actor=uploader,
            )
        return field_id


def _cell_row(cell: instances.SegmentedCell, crop_key: str, mask_key: str) -> dict:
    m = cell.morphometrics
    x0, y0, x1, y1 = cell.bbox
    return {
        "index_in_field": cell.index,
        "x0": x0,
        "y0": y0,
        "x1": x1,
        "y1": y1,
        "crop_key": crop_key,
        "mask_key": mask_key,
        "cell_area": m.cell_area,
        "nucleus_area": m.nucleus_area,
        "nucleus_cell_ratio": m.nucleus_cell_ratio,
        "nucleus_axis_ratio": m.nucleus_axis_ratio,
        "nucleus_width_ratio": m.nucleus_width_ratio,
        "touches_border": cell.touches_border,
        "status": "excluded" if cell.touches_border else "unlabelled",
    }
