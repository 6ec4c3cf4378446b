"""gRPC surface of the trainer: Ray Train jobs per round."""

from __future__ import annotations

import grpc

from bmcell.errors import NotFound
from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.settings import TrainerSettings
from bmcell.v1 import trainer_pb2, trainer_pb2_grpc


class TrainerServicer(trainer_pb2_grpc.TrainerServicer):
    def __init__(self, runtime: Runtime[TrainerSettings]) -> None:
        self.rt = runtime

    def GetJob(self, request: trainer_pb2.GetJobRequest, context):
        with self.rt.db.connection() as conn:
            row = conn.execute(
                "SELECT * FROM training_jobs WHERE id = %s", (request.job_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no training job {request.job_id!r}", field="job_id")
        return job_pb(row)


def job_pb(row: dict) -> trainer_pb2.TrainingJob:
    history = row["history"] or [{}]
    return trainer_pb2.TrainingJob(
        job_id=row["id"],
        round_id=row["round_id"] or 0,
        state=row["state"],
        epoch=row["epoch"],
        epochs=row["epochs"],
        validation_accuracy=history[-1].get("validation_accuracy", 0.0),
        model_version=row["model_version"] or 0,
        published=row["published"],
        message=row["message"],
    )


def build(runtime: Runtime[TrainerSettings]) -> Service:
    def register(server: grpc.Server) -> list[str]:
        trainer_pb2_grpc.add_TrainerServicer_to_server(TrainerServicer(runtime), server)
        return [trainer_pb2.DESCRIPTOR.services_by_name["Trainer"].full_name]

    return Service("trainer", register, on_stop=[runtime.db.close])
