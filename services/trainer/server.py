"""gRPC surface of the trainer: Ray Train jobs per round."""

from __future__ import annotations

import json
import time

import grpc

from bmcell.errors import NotFound, Unavailable
from bmcell.grpc_client import channel, service_token
from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.settings import TrainerSettings
from bmcell.training_progress import last_epoch, progress_pb, training_seconds
from bmcell.v1 import classifier_pb2, classifier_pb2_grpc, trainer_pb2, trainer_pb2_grpc
from services.trainer import jobs
from services.trainer.manager import JobManager
from services.trainer.plan import Overrides

WATCH_POLL_S = 0.5


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, runtime: Runtime[TrainerSettings], manager: JobManager) -> None:
        self.rt = runtime
        self.manager = manager

    def StartTraining(self, request: trainer_pb2.StartTrainingRequest, context):
        overrides = Overrides(
            epochs=request.epochs,
            num_workers=request.num_workers,
            cpus_per_worker=request.cpus_per_worker,
            learning_rate=request.learning_rate,
            batch_size=request.batch_size,
            per_class_cap=request.per_class_cap,
            max_accuracy_drop=request.max_accuracy_drop,
            input_size=request.input_size,
        )
        row = self.manager.start(request.round_id or None, overrides)
        return job_pb(row)

    def GetJob(self, request: trainer_pb2.GetJobRequest, context):
        row = jobs.get(self.rt.db, request.job_id)
        test_accuracy = 0.0
        if row["model_version"]:
            version = jobs.model_version(
                self.rt.db, self.rt.settings.model_name, row["model_version"]
            )
            test_accuracy = version["test_accuracy"] or 0.0
        return job_pb(row, test_accuracy)

    def CancelJob(self, request: trainer_pb2.GetJobRequest, context):
        return job_pb(self.manager.cancel(request.job_id))

    def WatchJob(self, request: trainer_pb2.GetJobRequest, context):
        sent = None
        while context.is_active():
            row = jobs.get(self.rt.db, request.job_id)
            progress = progress_pb(row)
            key = (progress.epoch, progress.state, progress.message, progress.epoch_seconds)
            if key != sent:
                sent = key
                yield progress
            if row["state"] in jobs.FINAL:
                return
            time.sleep(WATCH_POLL_S)

    def GetModelReport(self, request: trainer_pb2.GetModelReportRequest, context):
        name = self.rt.settings.model_name
        if request.version:
            row = jobs.model_version(self.rt.db, name, request.version)
        elif (row := jobs.active_version(self.rt.db, name)) is None:
            raise NotFound(f"{name} has no active version", field="version")
        return trainer_pb2.ModelReport(
            model_name=row["model_name"],
            version=row["version"],
            state=row["state"],
            validation_accuracy=row["validation_accuracy"] or 0.0,
            test_accuracy=row["test_accuracy"] or 0.0,
            metrics_json=json.dumps(row["metrics"]),
            confusion_key=row["confusion_key"] or "",
            note=row["note"],
            round_id=row["round_id"] or 0,
            **headline_figures(row["metrics"] or {}),
        )


HEADLINE = (
    "validation_balanced_accuracy",
    "validation_macro_f1",
    "test_balanced_accuracy",
    "test_macro_f1",
)


def headline_figures(metrics: dict) -> dict:
    """The report's figures beside accuracy; a version registered before they were
    stored has them in its per-split evaluations (mean recall is balanced accuracy)."""
    out: dict = {"test_set": metrics.get("test_set") or ""}
    for key in HEADLINE:
        value = metrics.get(key)
        if value is None and key.endswith("_balanced_accuracy"):
            value = (metrics.get(key.split("_")[0]) or {}).get("mean_recall")
        out[key] = value or 0.0
    return out


def job_pb(row: dict, test_accuracy: float = 0.0) -> trainer_pb2.TrainingJob:
    last = last_epoch(row)
    return trainer_pb2.TrainingJob(
        job_id=row["id"],
        round_id=row["round_id"] or 0,
        state=row["state"],
        epoch=row["epoch"],
        epochs=row["epochs"],
        validation_accuracy=last.get("validation_accuracy", 0.0),
        test_accuracy=test_accuracy,
        model_version=row["model_version"] or 0,
        published=row["published"],
        message=row["message"],
        loss=last.get("loss", 0.0),
        samples_per_second=last.get("samples_per_second", 0.0),
        epoch_seconds=last.get("seconds", 0.0),
        training_seconds=training_seconds(row),
    )


def classifier_activator(settings: TrainerSettings):
    """``activate(version)``: the classifier's ActivateModel, with a deadline."""

    def activate(version: int) -> None:
        try:
            with channel(
                settings.classifier_addr,
                default_timeout_s=settings.activate_timeout_s,
                token=service_token(settings),
            ) as ch:
                classifier_pb2_grpc.ClassifierStub(ch).ActivateModel(
                    classifier_pb2.ActivateModelRequest(version=version)
                )
        except grpc.RpcError as exc:
            raise Unavailable(
                f"classifier at {settings.classifier_addr} did not activate v{version}: "
                f"{exc.code().name}: {exc.details()}"
            ) from exc

    return activate


def build(runtime: Runtime[TrainerSettings]) -> Service:
    manager = JobManager(runtime, classifier_activator(runtime.settings))
    manager.resume_all()

    def register(server: grpc.Server) -> list[str]:
        trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(runtime, manager), server)
        return [trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name]

    return Service(
        "trainer",
        register,
        runtime.db,
        on_stop=[runtime.db.close],
        dependencies=[runtime.db.ping],
    )
