"""gRPC surface of the classifier: classification through Triton and model versions."""

from __future__ import annotations

import grpc

from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.settings import ClassifierSettings
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc, common_pb2
from services.classifier import versions


class ClassifierServicer(classifier_pb2_grpc.ClassifierServicer):
    def __init__(self, runtime: Runtime[ClassifierSettings]) -> None:
        self.rt = runtime

    def ListModels(self, request, context: grpc.ServicerContext):
        rows = versions.list_versions(self.rt.db, self.rt.settings.model_name)
        active = next((r["version"] for r in rows if r["state"] == "active"), 0)
        return classifier_pb2.ListModelsResponse(
            versions=[version_pb(r) for r in rows], active_version=active
        )


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
    def register(server: grpc.Server) -> list[str]:
        classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(runtime), server)
        return [classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name]

    return Service("classifier", register, on_stop=[runtime.db.close])
