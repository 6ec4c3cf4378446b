"""gRPC surface of the classifier: classification through Triton and model versions."""

from __future__ import annotations

import grpc
from prometheus_client import Counter, Gauge, Histogram

from bmcell import images, paging
from bmcell.auth import caller
from bmcell.errors import InvalidArgument
from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.settings import ClassifierSettings
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc, common_pb2
from services.classifier.inference import Inference
from services.classifier.serving import ModelServing
from services.classifier.triton_client import Triton

CELLS_CLASSIFIED = Counter("bmcell_classifier_cells_total", "Cells classified", ["rpc"])
BATCH_SIZE = Histogram(
    "bmcell_classifier_request_cells",
    "Cells per Classify request",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1024),
)
PREDICTIONS_WRITTEN = Counter("bmcell_predictions_written_total", "Prediction rows written")
ACTIVE_VERSION = Gauge("bmcell_model_active_version", "Version the classifier serves by default")


class ClassifierServicer(classifier_pb2_grpc.ClassifierServicer):
    def __init__(
        self, runtime: Runtime[ClassifierSettings], serving: ModelServing, inference: Inference
    ) -> None:
        self.rt = runtime
        self.serving = serving
        self.inference = inference

    def Classify(self, request: classifier_pb2.ClassifyRequest, context):
        if bool(request.cell_ids) == bool(request.images):
            raise InvalidArgument(
                "give either cell_ids or images (not both, not neither)", field="cell_ids"
            )
        s = self.rt.settings
        if len(request.cell_ids) > s.max_classify_cells:
            raise InvalidArgument(
                f"{len(request.cell_ids)} cell ids, the limit is {s.max_classify_cells} per call "
                "(BMCELL_MAX_CLASSIFY_CELLS); use PredictPool for more",
                field="cell_ids",
            )
        if len(request.images) > s.max_classify_images:
            raise InvalidArgument(
                f"{len(request.images)} images, the limit is {s.max_classify_images} per call "
                "(BMCELL_MAX_CLASSIFY_IMAGES)",
                field="images",
            )
        if request.images:
            row, probs = self.inference.classify_images(list(request.images), request.model_version)
        else:
            row, probs = self.inference.classify_cells(
                list(request.cell_ids), request.model_version, caller().sees_lab
            )
        BATCH_SIZE.observe(len(probs))
        CELLS_CLASSIFIED.labels("Classify").inc(len(probs))
        codes = [c["code"] for c in row["taxonomy"]["classes"]]
        return classifier_pb2.ClassifyResponse(
            results=[
                common_pb2.ClassProbabilities(
                    probabilities=p.tolist(), classes=codes, top1=int(p.argmax())
                )
                for p in probs
            ],
            model_name=row["model_name"],
            model_version=row["version"],
            calibrated=self.inference.temperature(row) is not None,
        )

    def PredictPool(self, request: classifier_pb2.PredictPoolRequest, context):
        if request.batch_size < 0:
            raise InvalidArgument(f"must be >= 0, got {request.batch_size}", field="batch_size")
        last_written = 0
        for p in self.inference.predict_pool(
            list(request.cell_ids), request.model_version, request.batch_size
        ):
            PREDICTIONS_WRITTEN.inc(p.written - last_written)
            CELLS_CLASSIFIED.labels("PredictPool").inc(p.written - last_written)
            last_written = p.written
            yield classifier_pb2.PredictPoolProgress(
                done=p.done,
                total=p.total,
                written=p.written,
                model_version=p.model_version,
                finished=p.finished,
                calibrated=p.calibrated,
            )

    def ListModels(self, request, context):
        size = paging.page_size(request.page_size, self.rt.settings.max_page_size)
        after = paging.decode("models", request.page_token, (int,))
        rows = self.serving.versions(limit=size + 1, after=after[0] if after else None)
        return classifier_pb2.ListModelsResponse(
            versions=[version_pb(r) for r in rows[:size]],
            active_version=self.serving.active_version(),
            next_page_token=paging.next_token("models", rows, size, lambda r: [r["version"]]),
        )

    def ActivateModel(self, request: classifier_pb2.ActivateModelRequest, context):
        if request.version <= 0:
            raise InvalidArgument(f"must be >= 1, got {request.version}", field="version")
        row = self.serving.activate(request.version)
        ACTIVE_VERSION.set(row["version"])
        return version_pb(row)

    def RollbackModel(self, request, context):
        row = self.serving.rollback()
        ACTIVE_VERSION.set(row["version"])
        return version_pb(row)


def version_pb(r: dict) -> common_pb2.ModelVersion:
    return common_pb2.ModelVersion(
        model_name=r["model_name"],
        version=r["version"],
        state=r["state"],
        input_size=r["input_size"],
        classes=[c["code"] for c in r["taxonomy"]["classes"]],
        validation_accuracy=r["validation_accuracy"] or 0.0,
        test_accuracy=r["test_accuracy"] or 0.0,
        created_at=r["created_at"].isoformat(),
        round_id=r["round_id"] or 0,
        note=r["note"],
    )


def build(runtime: Runtime[ClassifierSettings]) -> Service:
    s = runtime.settings
    triton = Triton(s.triton_url, s.triton_timeout_s, s.triton_retries, s.predict_cells_per_s)
    serving = ModelServing(runtime.db, runtime.store, triton, s.model_name, s.triton_repository)
    inference = Inference(
        runtime.db,
        runtime.store,
        triton,
        serving,
        s.batch_size,
        images.Limits.of(s),
        max_pool_cells=s.max_pool_cells,
        in_flight=s.triton_in_flight,
        calibrate=s.calibrate,
    )
    try:
        serving.restore()
        if (row := serving.active()) is not None:
            ACTIVE_VERSION.set(row["version"])
    except Exception:  # serve anyway: Classify retries the load and says why it fails
        runtime.log.exception("could not restore the active model version at start")

    def register(server: grpc.Server) -> list[str]:
        classifier_pb2_grpc.add_ClassifierServicer_to_server(
            ClassifierServicer(runtime, serving, inference), server
        )
        return [classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name]

    return Service(
        "classifier",
        register,
        runtime.db,
        on_stop=[inference.close, triton.close, runtime.db.close],
        dependencies=[runtime.db.ping],
    )
