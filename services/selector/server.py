"""gRPC surface of the selector: CST / AL candidate selection per round."""

from __future__ import annotations

import grpc

from bmcell.errors import NotFound
from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.settings import SelectorSettings
from bmcell.v1 import selector_pb2, selector_pb2_grpc


class SelectorServicer(selector_pb2_grpc.SelectorServicer):
    def __init__(self, runtime: Runtime[SelectorSettings]) -> None:
        self.rt = runtime

    def GetSelection(self, request: selector_pb2.GetSelectionRequest, context):
        with self.rt.db.connection() as conn:
            row = conn.execute(
                "SELECT s.*, (SELECT count(*) FROM review_tasks t WHERE t.round_id = s.round_id) AS tasks "
                "FROM selections s WHERE s.round_id = %s",
                (request.round_id,),
            ).fetchone()
        if row is None:
            raise NotFound(f"round {request.round_id} has no selection", field="round_id")
        return selection_pb(row, existing=True)


def selection_pb(row: dict, *, existing: bool) -> selector_pb2.Selection:
    return selector_pb2.Selection(
        round_id=row["round_id"],
        strategy=row["strategy"],
        seed=row["seed"],
        pool_size=row["pool_size"],
        sample_size=row["sample_size"],
        model_version=row["model_version"],
        counts_by_kind=row["counts_by_kind"],
        counts_by_class=row["counts_by_class"],
        tasks_created=row["tasks"],
        existing=existing,
    )


def build(runtime: Runtime[SelectorSettings]) -> Service:
    def register(server: grpc.Server) -> list[str]:
        selector_pb2_grpc.add_SelectorServicer_to_server(SelectorServicer(runtime), server)
        return [selector_pb2.DESCRIPTOR.services_by_name["Selector"].full_name]

    return Service("selector", register, on_stop=[runtime.db.close])
