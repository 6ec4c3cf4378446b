"""The study's comparison of strategies, run through the services.

Each strategy must start from the same bootstrap on the same pool, so the runner
bootstraps once, snapshots that state as a Postgres template database, and gives
every strategy its own copy: the services restart pointing at ``exp_<strategy>``
and serve the model under their own name (``<model>-<strategy>``, its bootstrap
version copied in object storage), so versions of different strategies never mix
in the models bucket or in Triton. Object storage is otherwise shared: cells and
fields are content-addressed and identical for everyone.

Where it reaches past the public calls: cloning the databases and renaming the
bootstrap's model versions in each clone (:func:`clone_database`,
:func:`copy_model`) are an operator's server-side work with Postgres and object
storage credentials, and the confusion matrices are read from object storage.
Everything else (people, uploads with test specimens marked, rounds, reviews,
results) goes through the same gRPC and HTTP calls a lab uses, with tokens.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psycopg

from bmcell import grpc_client, modelrepo, paging, scenario, triton
from bmcell.modelstore import state_dict_key
from bmcell.review_sim import ReviewStats, TruthIndex
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.stack.components import GRPC_SERVICES
from bmcell.storage import ObjectStore
from bmcell.studyreport import Effort, RoundResult, cost_rows, write_all
from bmcell.v1 import rounds_pb2, rounds_pb2_grpc, selector_pb2, trainer_pb2, trainer_pb2_grpc

SERVICES = [*GRPC_SERVICES, "labelapi"]
BOOTSTRAP = "bootstrap"  # the experiment name of the shared start
Say = Callable[[str], None]


@dataclass(frozen=True)
class ExperimentConfig:
    strategies: list[str]
    rounds: int
    out: Path
    labs: int = 3
    specimens: int = 4
    fields: int = 12
    size: int = 704
    sample: int = 1000
    epochs: int = 0
    bootstrap_epochs: int = 0
    seed: int = 0
    reviewers: scenario.Reviewers = field(default_factory=scenario.Reviewers)
    bootstrap: dict = field(
        default_factory=lambda: {
            "initial_per_class": 25,
            "validation_per_class": 10,
            "test_per_class": 10,
            "initial_reviews": 1,
            "test_reviews": 2,
            "wave_size": 300,
            "max_waves": 2,
        }
    )


def db_name(strategy: str) -> str:
    return "exp_" + re.sub(r"[^a-z0-9]+", "_", strategy.lower())


def _url(base_url: str, name: str) -> str:
    return base_url.rsplit("/", 1)[0] + f"/{name}"


def _admin(base_url: str) -> psycopg.Connection:
    return psycopg.connect(_url(base_url, "postgres"), autocommit=True)


def clone_database(base_url: str, source: str, target: str) -> None:
    """``CREATE DATABASE target TEMPLATE source`` (nobody may be connected to source)."""
    with _admin(base_url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{target}"')
        conn.execute(f'CREATE DATABASE "{target}" TEMPLATE "{source}"')


def copy_model(store: ObjectStore, url: str, model_name: str, new_name: str) -> None:
    """Give the strategy its own model name, starting from the bootstrap's versions."""
    with psycopg.connect(url, autocommit=True) as conn:
        versions = [
            r[0]
            for r in conn.execute(
                "SELECT version FROM model_versions WHERE model_name = %s", (model_name,)
            )
        ]
        conn.execute(
            "UPDATE model_versions SET model_name = %s WHERE model_name = %s",
            (new_name, model_name),
        )
    for v in versions:
        for key in store.list(f"{model_name}/{v}/", bucket=store.models_bucket):
            data = store.get(key, bucket=store.models_bucket)
            store.put(new_name + key[len(model_name) :], data, bucket=store.models_bucket)
        # The plain weights the next round transfers from (without them the trainer
        # would start the strategy's first round from scratch).
        weights = state_dict_key(model_name, v)
        if store.exists(weights):
            store.put(state_dict_key(new_name, v), store.get(weights))
    store.put(
        f"{new_name}/config.pbtxt",
        modelrepo.config_pbtxt(new_name).encode(),
        bucket=store.models_bucket,
    )


def fingerprint(cfg: ExperimentConfig) -> dict:
    """What a resumed run must share with the run that wrote ``cfg.out``."""
    keep = ("labs", "specimens", "fields", "size", "sample", "epochs", "bootstrap_epochs", "seed")
    return {k: getattr(cfg, k) for k in keep} | {
        "bootstrap": dict(sorted(cfg.bootstrap.items())),
        "reviewers": asdict(cfg.reviewers),
    }


class StrategyLog:
    """One strategy's finished rounds and the live one, in ``OUT/progress/<name>.json``,
    so a run that stopped (a reboot, a session's end) carries on where it was.

    Written after the round starts, after each review session and when it ends
    (atomically: a temporary file renamed over the old one). The rounds themselves
    are in the strategy's own database and survive a stop; this file keeps what only
    the runner knows: the review counts and the seconds per stage.
    """

    def __init__(self, path: Path, strategy: str, settings: dict) -> None:
        self.path = path
        self.strategy = strategy
        self.settings = settings
        self.rounds: list[dict] = []
        self.current: dict | None = None
        self.confusion_key = ""
        if path.exists():
            saved = json.loads(path.read_text())
            if saved.get("settings") != settings:
                raise ExperimentError(
                    f"{path} was written by a run with other settings "
                    f"({saved.get('settings')}); give a new --out (and --port-base), or "
                    "delete it with its stack to start this strategy again"
                )
            self.rounds = saved["rounds"]
            self.current = saved.get("current")
            self.confusion_key = saved.get("confusion_key", "")

    @property
    def started(self) -> bool:
        return bool(self.rounds) or self.current is not None

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "strategy": self.strategy,
                    "settings": self.settings,
                    "rounds": self.rounds,
                    "current": self.current,
                    "confusion_key": self.confusion_key,
                },
                indent=1,
            )
        )
        tmp.replace(self.path)

    def live(self, round_id: int, stats: ReviewStats, stages: dict[str, float]) -> None:
        self.current = {"round_id": round_id, "stats": _counts(stats), "stages": stages}
        self.save()

    def finish(self, r: rounds_pb2.Round, stats: ReviewStats, stages: dict[str, float]) -> None:
        self.rounds.append(
            {
                "round_id": r.round_id,
                "state": r.state,
                "result": asdict(_result(len(self.rounds) + 1, r)),
                "stats": _counts(stats),
                "stages": stages,
                "model_out": r.model_out,
            }
        )
        self.current = None
        self.save()

    def results(self, boot: RoundResult) -> list[RoundResult]:
        return [boot, *(RoundResult(**x["result"]) for x in self.rounds)]

    def effort(self) -> Effort:
        spent = [x["stats"] for x in self.rounds]
        return Effort(**{k: sum(s[k] for s in spent) for k in asdict(Effort())})


class ExperimentError(RuntimeError):
    """The experiment cannot go on as asked (said in the message)."""


_COUNTS = ("reviews", "confirms", "corrections", "difficult", "adjudications", "labelled")


def _counts(stats: ReviewStats) -> dict:
    return {k: getattr(stats, k) for k in _COUNTS} | {"seconds": round(stats.seconds, 1)}


def _stats(counts: dict | None) -> ReviewStats:
    return ReviewStats(**(counts or {}))


def _result(number: int, r: rounds_pb2.Round) -> RoundResult:
    return RoundResult(
        round=number,  # the service numbers bootstrap attempts too
        test_accuracy=r.test_accuracy,
        validation_accuracy=r.validation_accuracy,
        added=r.labels_added,
        added_by_class=dict(r.labels_added_by_class),
        promoted=r.promoted,
    )


def run(cfg: ExperimentConfig, stack: Stack, say: Say) -> dict[str, Path]:
    """Bootstrap once, then every strategy's rounds from it; resumes a stopped run.

    Run again with the same ``cfg.out`` and stack after a stop: the synthetic fields,
    the uploads and a published bootstrap are reused, finished strategies are not run
    again, and a strategy that stopped carries on with its live round.
    """
    stack.up()
    env = stack.env()
    # Every client below (gRPC, HTTP, libpq for the clones, S3 for the model copies)
    # speaks TLS to this stack with its CA: its settings, not the caller's.
    os.environ.update(env)
    settings = load(Settings)
    store = ObjectStore(settings).ensure_buckets()
    started = time.monotonic()
    manifest = scenario.synthesize(
        cfg.out / "synth", cfg.labs, cfg.specimens, cfg.fields, cfg.seed, cfg.size, say
    )
    _save_setup(cfg.out, "synthesis", time.monotonic() - started)
    say("operator 'experiment-operator' gets an API token for the labs' uploads and the rounds")
    # Issued before the strategies' databases are cloned, so it works in each of them.
    admin = stack.admin_token()
    token = scenario.person_token(
        env["BMCELL_LABELAPI_URL"], admin, "experiment-operator", expires_days=7
    )
    boot = published_bootstrap(env["BMCELL_ROUNDS_ADDR"], token)
    if boot is None:  # uploads of a stopped run are deduplicated, so redoing them is safe
        started = time.monotonic()
        scenario.upload(manifest, say, token, env, test_per_lab=1)
        _save_setup(cfg.out, "uploads", time.monotonic() - started)
    truth = TruthIndex.from_manifest(
        manifest, scenario.segmenter_cells(env["BMCELL_SEGMENTER_ADDR"], token)
    )
    # Cell ids are the same in every strategy's copy of the database: fix the answers now.
    truth = TruthIndex.from_mapping(truth.mapping())
    say(f"truth known for {len(truth)} cells; bootstrap, shared by every strategy")
    if boot is not None:
        say(f"bootstrap already published (round {boot.number}, {boot.model_out}): reused")
    else:
        started = time.monotonic()
        boot = _bootstrap(cfg, env, admin, truth, token, say)
        _save_setup(cfg.out, "bootstrap", time.monotonic() - started)
    if boot.state != "published":
        raise RuntimeError(f"bootstrap ended {boot.state}: {boot.message}")
    base_db = env["BMCELL_DATABASE_URL"].rsplit("/", 1)[1]
    stack.stop(SERVICES)
    clone_database(env["BMCELL_DATABASE_URL"], base_db, "exp_bootstrap")

    logs: dict[str, StrategyLog] = {}
    boot_result = RoundResult(
        round=0,
        test_accuracy=boot.test_accuracy,
        validation_accuracy=boot.validation_accuracy,
        added=0,
    )
    for strategy in cfg.strategies:
        name = db_name(strategy)
        log = StrategyLog(cfg.out / "progress" / f"{name}.json", strategy, fingerprint(cfg))
        logs[strategy] = log
        if len(log.rounds) >= cfg.rounds:
            say(f"strategy {strategy}: its {cfg.rounds} rounds are done (from {log.path})")
            continue
        model = f"{settings.model_name}-{name.removeprefix('exp_').replace('_', '-')}"
        url = _url(env["BMCELL_DATABASE_URL"], name)
        if log.started:
            say(f"strategy {strategy}: resumed after round {len(log.rounds)} ({name}, {model})")
        else:
            say(f"strategy {strategy}: database {name}, model {model}")
            clone_database(env["BMCELL_DATABASE_URL"], "exp_bootstrap", name)
            copy_model(store, url, settings.model_name, model)
            log.save()
        stack.up(only=SERVICES, extra_env={"BMCELL_DATABASE_URL": url, "BMCELL_MODEL_NAME": model})
        last = _strategy_rounds(cfg, env, strategy, log, token, admin, truth, say)
        if last:
            log.confusion_key = _confusion_key(env["BMCELL_TRAINER_ADDR"], token, last)
            log.save()
        stack.stop(SERVICES)
        _unload(env["BMCELL_TRITON_URL"], model)
    by_strategy = {s: log.results(boot_result) for s, log in logs.items()}
    # The reviews each strategy's own rounds asked for (the shared bootstrap's are
    # nobody's cost in the comparison).
    effort = {s: log.effort() for s, log in logs.items()}
    costs = cost_rows(
        {s: [x["stages"] for x in log.rounds] for s, log in logs.items()}, _load_setup(cfg.out)
    )
    written = write_all(by_strategy, effort, cfg.out, costs=costs)
    for strategy, log in logs.items():
        if log.confusion_key:
            path = cfg.out / f"confusion-{db_name(strategy).removeprefix('exp_')}.png"
            path.write_bytes(store.get(log.confusion_key))
            written[path.name] = path
    stack.up(only=SERVICES)  # back on the main database
    return written


def _strategy_rounds(
    cfg: ExperimentConfig,
    env: dict[str, str],
    strategy: str,
    log: StrategyLog,
    token: str,
    admin: str,
    truth: TruthIndex,
    say: Say,
) -> int:
    """Run (or carry on with) the strategy's rounds; returns the last one's model."""
    rounds_addr = env["BMCELL_ROUNDS_ADDR"]
    live = log.current
    for i in range(len(log.rounds), cfg.rounds):
        before = _stats(live["stats"]) if live else ReviewStats()
        stages: dict[str, float] = dict(live["stages"]) if live else {}
        request = rounds_pb2.StartRoundRequest(
            experiment=BOOTSTRAP,
            strategy=strategy,
            epochs=cfg.epochs,
            selection=selector_pb2.SelectionParameters(
                sample_size=cfg.sample, seed=cfg.seed + 1000 + i
            ),
        )
        follow = live["round_id"] if live else 0
        for attempt in range(2):
            r, stats = scenario.run_round(
                rounds_addr,
                request,
                token=token,
                labelapi_url=env["BMCELL_LABELAPI_URL"],
                admin_token=admin,
                truth=truth,
                reviewers=cfg.reviewers,
                say=say,
                follow=follow,
                stages=stages,
                checkpoint=lambda r, st, b=before, sg=stages: log.live(
                    r.round_id, scenario.add_stats(b, st), sg
                ),
            )
            before = scenario.add_stats(before, stats)
            if r.state == "published" or not r.failed_step or attempt:
                break
            say(f"  round {r.number} failed at {r.failed_step}: retried once")
            follow = _retry(rounds_addr, token, r.round_id)
        if r.state != "published":
            raise ExperimentError(
                f"{strategy} round {i + 1} ended {r.state}: {r.message} (run again to resume; "
                f"`bmcell round retry {r.round_id}` if it can be retried)"
            )
        log.finish(r, before, stages)
        live = None
    return log.rounds[-1]["model_out"] if log.rounds else 0


def _retry(rounds_addr: str, token: str, round_id: int) -> int:
    with grpc_client.channel(rounds_addr, default_timeout_s=30, token=token) as ch:
        r = rounds_pb2_grpc.RoundsStub(ch).RetryRound(
            rounds_pb2.RetryRoundRequest(round_id=round_id)
        )
    return r.round_id


def _save_setup(out: Path, step: str, seconds: float) -> None:
    """A set-up step's seconds, the first time it ran (a resumed run that reuses the
    step's work does not overwrite what it cost)."""
    path = out / "progress" / "setup.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved.setdefault(step, round(seconds, 1))
    path.write_text(json.dumps(saved, indent=1))


def _load_setup(out: Path) -> dict[str, float]:
    path = out / "progress" / "setup.json"
    return json.loads(path.read_text()) if path.exists() else {}


def published_bootstrap(rounds_addr: str, token: str) -> rounds_pb2.Round | None:
    """The experiment's bootstrap when an earlier run already published it: an
    experiment that stopped later (a strategy's round failed, the machine restarted)
    starts again from the same initial model instead of labelling anew."""
    with grpc_client.channel(rounds_addr, default_timeout_s=30, token=token) as ch:
        stub = rounds_pb2_grpc.RoundsStub(ch)
        request = rounds_pb2.ListRoundsRequest(experiment=BOOTSTRAP)
        rounds = list(paging.follow(stub.ListRounds, request, "rounds"))
    done = [r for r in rounds if r.strategy == "bootstrap" and r.state == "published"]
    return done[-1] if done else None


def _confusion_key(trainer_addr: str, token: str, version: int) -> str:
    """Object key of a version's confusion matrix (the trainer's GetModelReport, of the
    model the services serve now)."""
    with grpc_client.channel(trainer_addr, default_timeout_s=30, token=token) as ch:
        report = trainer_pb2_grpc.TrainerStub(ch).GetModelReport(
            trainer_pb2.GetModelReportRequest(version=version)
        )
    return report.confusion_key


def _bootstrap(
    cfg: ExperimentConfig,
    env: dict[str, str],
    admin: str,
    truth: TruthIndex,
    token: str,
    say: Say,
) -> rounds_pb2.Round:
    boot, _ = scenario.bootstrap(
        env["BMCELL_ROUNDS_ADDR"],
        rounds_pb2.StartRoundRequest(
            experiment=BOOTSTRAP,
            strategy="bootstrap",
            epochs=cfg.bootstrap_epochs,
            **cfg.bootstrap,
            selection=selector_pb2.SelectionParameters(seed=cfg.seed),
        ),
        token=token,
        labelapi_url=env["BMCELL_LABELAPI_URL"],
        admin_token=admin,
        truth=truth,
        reviewers=cfg.reviewers,
        say=say,
    )
    return boot


def _unload(triton_url: str, model: str) -> None:
    client = triton.client(triton_url)
    try:
        client.unload_model(model, client_timeout=60)
    except Exception:  # an experiment's result does not depend on freeing memory
        pass
    finally:
        client.close()
