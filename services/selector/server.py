"""gRPC surface of the selector: CST / AL candidate selection per round."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge

from bmcell import grpc_client
from bmcell.errors import NotFound, Unavailable
from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.settings import SelectorSettings
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc, selector_pb2, selector_pb2_grpc
from services.selector.candidates import (
    DEFAULT_AL_MARGIN,
    DEFAULT_CST_THRESHOLD,
    DEFAULT_SAMPLE_SIZE,
    CandidateSelector,
    SelectionRequest,
)
from services.selector.store import get_selection

CANDIDATES = Counter(
    "bmcell_selector_candidates_total", "Cells selected for review or pseudo-labelling", ["kind"]
)
POOL_SIZE = Gauge("bmcell_selector_pool_cells", "Unlabelled pool size at the last selection")


class SelectorServicer(selector_pb2_grpc.SelectorServicer):
    def __init__(self, runtime: Runtime[SelectorSettings]) -> None:
        self.rt = runtime
        channel = grpc_client.channel(
            runtime.settings.classifier_addr,
            default_timeout_s=runtime.settings.outbound_timeout_s,
            token=grpc_client.service_token(runtime.settings),
        )
        self.classifier = classifier_pb2_grpc.ClassifierStub(channel)
        self.selector = CandidateSelector(runtime.db, runtime.settings.model_name, self._predict)

    def _predict(self, cell_ids: list[int]) -> int:
        """Ask the classifier to predict and store these cells; returns the model version."""
        version = 0
        # Pool prediction takes time in proportion to the sample (BMCELL_PREDICT_CELLS_PER_S).
        timeout = self.rt.settings.prediction_deadline_s(len(cell_ids))
        try:
            for progress in self.classifier.PredictPool(
                classifier_pb2.PredictPoolRequest(cell_ids=cell_ids), timeout=timeout
            ):
                version = progress.model_version
        except grpc.RpcError as exc:
            raise Unavailable(
                f"classifier at {self.rt.settings.classifier_addr} failed to predict the sample: "
                f"{exc.code().name} {exc.details()}"
            ) from exc
        return version

    def SelectCandidates(self, request: selector_pb2.SelectCandidatesRequest, context):
        p = request.parameters
        outcome = self.selector.select(
            SelectionRequest(
                round_id=request.round_id,
                strategy=request.strategy,
                sample_size=p.sample_size or DEFAULT_SAMPLE_SIZE,
                cst_threshold=p.cst_threshold or DEFAULT_CST_THRESHOLD,
                al_margin=p.al_margin or DEFAULT_AL_MARGIN,
                per_class_cap=p.per_class_cap or None,
                seed=p.seed if p.HasField("seed") else None,
                labs=list(p.labs),
            )
        )
        if not outcome.existing:
            record = outcome.record
            POOL_SIZE.set(record["pool_size"])
            for kind, n in record["counts_by_kind"].items():
                CANDIDATES.labels(kind=kind).inc(n)
        return selection_pb(outcome.record, existing=outcome.existing)

    def GetSelection(self, request: selector_pb2.GetSelectionRequest, context):
        with self.rt.db.connection() as conn:
            row = get_selection(conn, request.round_id)
        if row is None:
            raise NotFound(f"round {request.round_id} has no selection", field="round_id")
        return selection_pb(row, existing=True)


def selection_pb(row: dict, *, existing: bool) -> selector_pb2.Selection:
    per_class: dict[str, int] = {}
    for counts in row["counts_by_class"].values():
        for code, n in counts.items():
            per_class[code] = per_class.get(code, 0) + n
    return selector_pb2.Selection(
        round_id=row["round_id"],
        strategy=row["strategy"],
        seed=row["seed"],
        pool_size=row["pool_size"],
        sample_size=row["sample_size"],
        model_version=row["model_version"],
        counts_by_kind=row["counts_by_kind"],
        counts_by_class=per_class,
        tasks_created=row["tasks"],
        existing=existing,
    )


def build(runtime: Runtime[SelectorSettings]) -> Service:
    def register(server: grpc.Server) -> list[str]:
        selector_pb2_grpc.add_SelectorServicer_to_server(SelectorServicer(runtime), server)
        return [selector_pb2.DESCRIPTOR.services_by_name["Selector"].full_name]

    return Service(
        "selector",
        register,
        runtime.db,
        on_stop=[runtime.db.close],
        dependencies=[runtime.db.ping],
    )
