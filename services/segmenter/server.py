"""gRPC surface of the segmenter: field image upload and cell listing."""

from __future__ import annotations

import grpc

from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.settings import SegmenterSettings
from bmcell.v1 import common_pb2, segmenter_pb2, segmenter_pb2_grpc
from services.segmenter import cells as cells_repo


class SegmenterServicer(segmenter_pb2_grpc.SegmenterServicer):
    def __init__(self, runtime: Runtime[SegmenterSettings]) -> None:
        self.rt = runtime

    def ListCells(self, request: segmenter_pb2.ListCellsRequest, context: grpc.ServicerContext):
        rows = cells_repo.list_cells(
            self.rt.db,
            lab=request.lab or None,
            specimen=request.specimen or None,
            field_id=request.field_id or None,
            limit=request.limit or None,
        )
        return segmenter_pb2.ListCellsResponse(cells=[_cell_pb(r) for r in rows])


def _cell_pb(r: dict) -> common_pb2.Cell:
    return common_pb2.Cell(
        cell_id=r["id"],
        field_id=r["field_id"],
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
    )


def build(runtime: Runtime[SegmenterSettings]) -> Service:
    def register(server: grpc.Server) -> list[str]:
        segmenter_pb2_grpc.add_SegmenterServicer_to_server(SegmenterServicer(runtime), server)
        return [segmenter_pb2.DESCRIPTOR.services_by_name["Segmenter"].full_name]

    return Service("segmenter", register, on_stop=[runtime.db.close])
