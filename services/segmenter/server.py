"""gRPC surface of the segmenter: field image upload and cell listing.

Both calls carry a token from ``bmcell users token NAME`` in the ``authorization``
metadata (``Bearer <token>``), checked by the shared interceptor (bmcell.grpc_auth,
bmcell.policy) before any message of the stream is read; the lab checks here read
the caller it set.
"""

from __future__ import annotations

from contextlib import closing

import grpc

from bmcell import paging, streams
from bmcell.auth import caller
from bmcell.errors import InvalidArgument
from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.settings import SegmenterSettings
from bmcell.v1 import common_pb2, segmenter_pb2, segmenter_pb2_grpc
from services.segmenter import cells as cells_repo
from services.segmenter import models, workers
from services.segmenter.ingest import Ingestor, UploadHeader


def upload_header(h: segmenter_pb2.UploadHeader) -> UploadHeader:
    """The proto's header as the ingestor's; an unset ``um_per_px`` is None (unknown)."""
    return UploadHeader(
        h.lab,
        h.specimen,
        h.diagnosis,
        h.filename,
        h.sha256,
        h.role,
        h.um_per_px if h.HasField("um_per_px") else None,
    )


class SegmenterServicer(segmenter_pb2_grpc.SegmenterServicer):
    def __init__(self, runtime: Runtime[SegmenterSettings], ingestor: Ingestor) -> None:
        self.rt = runtime
        self.ingestor = ingestor

    def Upload(self, request_iterator, context: grpc.ServicerContext):
        principal = caller()
        settings = self.rt.settings
        # A stream idle or slower than the floor is refused rather than holding a worker;
        # closing it however the call ends stops its reader thread.
        with closing(
            streams.paced(
                request_iterator,
                idle_timeout_s=settings.upload_idle_timeout_s,
                min_bytes_per_s=settings.upload_min_bytes_per_s,
                size=lambda m: len(m.chunk),
            )
        ) as messages:
            first = next(messages, None)
            if first is None or first.WhichOneof("part") != "header":
                raise InvalidArgument("the first message must carry the header", field="header")
            header = upload_header(first.header)
            chunks = (_chunk(m) for m in messages)
            r = self.ingestor.upload(header, chunks, principal)
        return segmenter_pb2.UploadResponse(
            field_id=r.field_id,
            sha256=r.sha256,
            duplicate=r.duplicate,
            cells=r.cells,
            border_cells=r.border_cells,
            width=r.width,
            height=r.height,
            segmentation_seconds=r.segmentation_seconds,
        )

    def ListCells(self, request: segmenter_pb2.ListCellsRequest, context: grpc.ServicerContext):
        principal = caller()
        size = paging.page_size(request.page_size or request.limit, self.rt.settings.max_page_size)
        after = paging.decode("cells", request.page_token, (int,))
        rows = cells_repo.list_cells(
            self.rt.db,
            lab=request.lab or None,
            specimen=request.specimen or None,
            field_id=request.field_id or None,
            limit=size + 1,
            after_id=after[0] if after else None,
            lab_ids=None if principal.all_labs else principal.lab_list(),
        )
        return segmenter_pb2.ListCellsResponse(
            cells=[_cell_pb(r) for r in rows[:size]],
            next_page_token=paging.next_token("cells", rows, size, lambda r: [r["id"]]),
        )


def _chunk(message: segmenter_pb2.UploadRequest) -> bytes:
    if message.WhichOneof("part") != "chunk":
        raise InvalidArgument("only the first message may carry a header", field="chunk")
    return message.chunk


def _cell_pb(r: dict) -> common_pb2.Cell:
    return common_pb2.Cell(
        cell_id=r["id"],
        field_id=r["field_id"] or 0,  # 0: an imported crop, which has no field
        lab=r["lab"],
        specimen=r["specimen"],
        bbox=common_pb2.BoundingBox(x0=r["x0"], y0=r["y0"], x1=r["x1"], y1=r["y1"]),
        morphometrics=common_pb2.Morphometrics(
            cell_area_px=r["cell_area"],
            nucleus_area_px=r["nucleus_area"],
            nucleus_cell_ratio=r["nucleus_cell_ratio"],
            nucleus_axis_ratio=r["nucleus_axis_ratio"],
            nucleus_narrowest_widest_ratio=r["nucleus_width_ratio"],
        ),
        touches_border=r["touches_border"],
        status=r["status"],
        crop_key=r["crop_key"],
        field_sha256=(r["field_sha256"] or "").strip(),
    )


def build(runtime: Runtime[SegmenterSettings]) -> Service:
    settings = runtime.settings
    seeded = models.seed_bundled(runtime.store, settings.segmenter_model)
    if seeded:
        runtime.log.info("seeded bundled segmentation weights", key=seeded)
    model = models.load_latest(runtime.store, settings.segmenter_model)
    if model is None:
        runtime.log.warning("no segmentation model; uploads are refused", hint=models.NO_MODEL)
    else:
        runtime.log.info("segmentation model loaded", model=model.name)
    holder = models.ModelHolder(model, settings.torch_threads)
    pool = None
    if model is not None:
        pool = workers.SegmentPool(
            model.weights,
            workers=settings.segmenter_workers,
            threads=settings.torch_threads,
            timeout_s=settings.segment_timeout_s,
            seconds_per_megapixel=settings.segment_seconds_per_megapixel,
        )
        pool.start()
    ingestor = Ingestor(runtime.db, runtime.store, settings, holder, pool)

    def register(server: grpc.Server) -> list[str]:
        segmenter_pb2_grpc.add_SegmenterServicer_to_server(
            SegmenterServicer(runtime, ingestor), server
        )
        return [segmenter_pb2.DESCRIPTOR.services_by_name["Segmenter"].full_name]

    return Service(
        "segmenter",
        register,
        runtime.db,
        # After the server's grace: the uploads still running need their workers.
        on_stop=[*([pool.close] if pool else []), runtime.db.close],
        dependencies=[runtime.db.ping],
    )
