"""gRPC surface of the rounds service, and the driver thread that moves rounds along."""

from __future__ import annotations

import threading

import grpc
from google.protobuf.json_format import MessageToDict, ParseDict

from bmcell import grpc_client, paging
from bmcell.errors import InvalidArgument, Unavailable
from bmcell.grpc_server import Service
from bmcell.runtime import Runtime
from bmcell.selection import ROUND_STRATEGIES
from bmcell.settings import RoundsSettings
from bmcell.training_progress import progress_pb
from bmcell.v1 import (
    rounds_pb2,
    rounds_pb2_grpc,
    selector_pb2,
    selector_pb2_grpc,
    trainer_pb2,
    trainer_pb2_grpc,
)
from services.rounds import store
from services.rounds.driver import Job, Ports, RoundDriver, Selected, run_forever

STRATEGIES_WITH_BOOTSTRAP = ("bootstrap", *ROUND_STRATEGIES)


class RoundsServicer(rounds_pb2_grpc.RoundsServicer):
    def __init__(self, runtime: Runtime[RoundsSettings]) -> None:
        self.rt = runtime

    def StartRound(self, request: rounds_pb2.StartRoundRequest, context):
        if request.strategy not in STRATEGIES_WITH_BOOTSTRAP:
            raise InvalidArgument(
                f"unknown strategy {request.strategy!r}; expected one of "
                f"{list(STRATEGIES_WITH_BOOTSTRAP)}",
                field="strategy",
            )
        for name in ("review_quorum", "gate"):
            if not 0 <= getattr(request, name) <= 1:
                raise InvalidArgument(
                    f"must be in [0, 1], got {getattr(request, name)}", field=name
                )
        for name in (
            "epochs",
            "review_deadline_s",
            "initial_per_class",
            "validation_per_class",
            "test_per_class",
            "initial_reviews",
            "test_reviews",
            "wave_size",
            "max_waves",
        ):
            if getattr(request, name) < 0:
                raise InvalidArgument(f"must be >= 0, got {getattr(request, name)}", field=name)
        with self.rt.db.transaction() as conn:
            row = store.create(
                conn, request.experiment or "main", request.strategy, round_params(request)
            )
        return self._round_pb(row)

    def RetryRound(self, request: rounds_pb2.RetryRoundRequest, context):
        if request.round_id <= 0:
            raise InvalidArgument("must name a round, got 0", field="round_id")
        with self.rt.db.transaction() as conn:
            row = store.retry(conn, request.round_id)
        return self._round_pb(row)

    def GetRound(self, request: rounds_pb2.GetRoundRequest, context):
        with self.rt.db.connection() as conn:
            row = (
                store.get(conn, request.round_id)
                if request.round_id
                else store.latest(conn, request.experiment or "main")
            )
        return self._round_pb(row)

    def ListRounds(self, request: rounds_pb2.ListRoundsRequest, context):
        size = paging.page_size(request.page_size, self.rt.settings.max_page_size)
        after = paging.decode("rounds", request.page_token, (str, int))
        with self.rt.db.connection() as conn:
            rows = store.list_rounds(
                conn,
                request.experiment or None,
                limit=size + 1,
                after=(after[0], after[1]) if after else None,
            )
        return rounds_pb2.ListRoundsResponse(
            rounds=[self._round_pb(r) for r in rows[:size]],
            next_page_token=paging.next_token(
                "rounds", rows, size, lambda r: [r["experiment"], r["number"]]
            ),
        )

    def _round_pb(self, r: dict) -> rounds_pb2.Round:
        # Figures the trainer records with the version (absent: 0 / empty).
        with self.rt.db.connection() as conn:
            tasks = store.task_counts(conn, r["id"])
            added = store.labels_added(conn, r["id"])
            mv = store.model_version(conn, self.rt.settings.model_name, r["model_out"] or 0)
            job = store.latest_job(conn, r["id"], list(r["params"].get("retried_jobs", [])))
        metrics = (mv or {}).get("metrics") or {}
        return rounds_pb2.Round(
            round_id=r["id"],
            experiment=r["experiment"],
            number=r["number"],
            strategy=r["strategy"],
            state=r["state"],
            model_in=r["model_in"] or 0,
            model_out=r["model_out"] or 0,
            message=r["message"],
            tasks_by_state=tasks,
            labels_added_by_class=added,
            labels_added=sum(added.values()),
            validation_accuracy=(mv or {}).get("validation_accuracy") or 0.0,
            test_accuracy=(mv or {}).get("test_accuracy") or 0.0,
            training_job=r["params"].get("training_job") or (job["id"] if job else ""),
            created_at=r["created_at"].isoformat(),
            updated_at=r["updated_at"].isoformat(),
            # This round's own version went into service (not one a round with
            # nothing to add kept).
            promoted=bool(
                mv
                and mv["round_id"] == r["id"]
                and mv["state"] in ("active", "retired")
                and mv["activated_at"]
            ),
            short_classes=list(r["short_classes"]),
            test_balanced_accuracy=float(metrics.get("test_balanced_accuracy") or 0.0),
            test_macro_f1=float(metrics.get("test_macro_f1") or 0.0),
            test_set=str(metrics.get("test_set") or ""),
            failed_step=r["failed_step"] or "",
            training=progress_pb(job) if job else None,
        )


def round_params(request: rounds_pb2.StartRoundRequest) -> dict:
    """What a round keeps of its request: everything but its name and strategy, with
    the selection (its seed included, which the bootstrap's waves use too)."""
    params = MessageToDict(request, preserving_proto_field_name=True)
    params.pop("experiment", None)
    params.pop("strategy", None)
    params["labs"] = list(request.selection.labs)
    return params


# The selector's default sample when a round names none (services/selector/candidates).
DEFAULT_SAMPLE_SIZE = 5000


def selection_deadline_s(settings: RoundsSettings, params: dict) -> float:
    """A selection predicts its sample first: its deadline grows with the sample."""
    sample = int(params.get("sample_size") or DEFAULT_SAMPLE_SIZE)
    return settings.selection_timeout_s + settings.prediction_deadline_s(sample)


def grpc_ports(settings: RoundsSettings) -> Ports:
    timeout = settings.outbound_timeout_s
    token = grpc_client.service_token(settings)
    selector = selector_pb2_grpc.SelectorStub(
        grpc_client.channel(settings.selector_addr, default_timeout_s=timeout, token=token)
    )
    trainer = trainer_pb2_grpc.TrainerStub(
        grpc_client.channel(settings.trainer_addr, default_timeout_s=timeout, token=token)
    )

    def call(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(f"{what}: {exc.code().name} {exc.details()}") from exc
            raise RuntimeError(f"{what}: {exc.code().name} {exc.details()}") from exc

    def select(round_id: int, strategy: str, params: dict) -> Selected:
        sel = call(
            "selector",
            selector.SelectCandidates,
            selector_pb2.SelectCandidatesRequest(
                round_id=round_id,
                strategy=strategy,
                parameters=ParseDict(params, selector_pb2.SelectionParameters()),
            ),
            timeout=selection_deadline_s(settings, params),
        )
        return Selected(pool_size=sel.pool_size, sample_size=sel.sample_size)

    def start_training(round_id: int, epochs: int) -> str:
        job = call(
            "trainer",
            trainer.StartTraining,
            trainer_pb2.StartTrainingRequest(round_id=round_id, epochs=epochs),
        )
        return job.job_id

    def get_job(job_id: str) -> Job:
        job = call("trainer", trainer.GetJob, trainer_pb2.GetJobRequest(job_id=job_id))
        return Job(job.job_id, job.state, job.model_version, job.message)

    return Ports(select, start_training, get_job)


def build(runtime: Runtime[RoundsSettings]) -> Service:
    driver = RoundDriver(runtime.db, grpc_ports(runtime.settings), runtime.settings.model_name)
    stop = threading.Event()
    thread = threading.Thread(
        target=run_forever,
        name="round-driver",
        args=(driver, runtime.settings.poll_interval_s, stop),
        daemon=True,
    )

    def register(server: grpc.Server) -> list[str]:
        rounds_pb2_grpc.add_RoundsServicer_to_server(RoundsServicer(runtime), server)
        thread.start()
        return [rounds_pb2.DESCRIPTOR.services_by_name["Rounds"].full_name]

    def halt() -> None:
        stop.set()
        thread.join(timeout=30)

    return Service(
        "rounds",
        register,
        runtime.db,
        on_stop=[halt, runtime.db.close],
        dependencies=[runtime.db.ping],
    )
