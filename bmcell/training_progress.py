"""A training job's progress as the public API shows it, from its ``training_jobs`` row.

The trainer's GetJob / WatchJob and the rounds service's Round (its ``training``
field, while a round trains and after) read the same row and must say the same
thing, so the conversion lives here once.
"""

from __future__ import annotations

from bmcell.v1 import trainer_pb2


def last_epoch(row: dict) -> dict:
    """The last finished epoch's record (empty before the first ends)."""
    return (row.get("history") or [{}])[-1]


def training_seconds(row: dict) -> float:
    """Every finished epoch's wall time together (validation and checkpoint included)."""
    return float(sum(h.get("seconds", 0.0) for h in row.get("history") or []))


def progress_pb(row: dict) -> trainer_pb2.TrainingProgress:
    last = last_epoch(row)
    return trainer_pb2.TrainingProgress(
        job_id=row["id"],
        epoch=row["epoch"],
        epochs=row["epochs"],
        loss=last.get("loss", 0.0),
        train_accuracy=last.get("train_accuracy", 0.0),
        validation_accuracy=last.get("validation_accuracy", 0.0),
        samples_per_second=last.get("samples_per_second", 0.0),
        state=row["state"],
        message=row["message"],
        epoch_seconds=last.get("seconds", 0.0),
        training_seconds=training_seconds(row),
    )


def epoch_line(
    epoch: int,
    epochs: int,
    loss: float,
    validation_accuracy: float,
    seconds: float,
    samples_per_second: float,
) -> str:
    """One finished epoch in words, e.g. "epoch 3/30: loss 1.2345, validation 0.8125,
    41.2 s (212 samples/s)": the job's message, and what the CLI and the demo print
    for each epoch while a round trains."""
    timing = f", {seconds:.1f} s ({samples_per_second:.0f} samples/s)" if seconds else ""
    return f"epoch {epoch}/{epochs}: loss {loss:.4f}, validation {validation_accuracy:.4f}{timing}"


def progress_line(p: trainer_pb2.TrainingProgress) -> str:
    return epoch_line(
        p.epoch, p.epochs, p.loss, p.validation_accuracy, p.epoch_seconds, p.samples_per_second
    )
