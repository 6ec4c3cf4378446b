"""A training job's progress in the public API (bmcell/training_progress.py)."""

from __future__ import annotations

from bmcell.training_progress import epoch_line, progress_line, progress_pb


def job_row(history: list[dict]) -> dict:
    return {
        "id": "train-x",
        "epoch": len(history),
        "epochs": 30,
        "history": history,
        "state": "running",
        "message": "",
    }


def test_progress_carries_the_last_epoch_and_the_seconds_of_all() -> None:
    history = [
        {"epoch": 1, "loss": 2.5, "validation_accuracy": 0.25, "samples_per_second": 180.0,
         "train_accuracy": 0.2, "seconds": 12.0},
        {"epoch": 2, "loss": 2.0, "validation_accuracy": 0.5, "samples_per_second": 210.0,
         "train_accuracy": 0.4, "seconds": 10.5},
    ]  # fmt: skip
    p = progress_pb(job_row(history))
    assert (p.epoch, p.epochs, p.loss, p.validation_accuracy) == (2, 30, 2.0, 0.5)
    assert p.epoch_seconds == 10.5 and p.training_seconds == 22.5
    assert progress_line(p) == "epoch 2/30: loss 2.0000, validation 0.5000, 10.5 s (210 samples/s)"


def test_before_the_first_epoch_and_without_seconds() -> None:
    p = progress_pb(job_row([]))
    assert (p.epoch, p.epoch_seconds, p.training_seconds) == (0, 0.0, 0.0)
    # A history written before epochs were timed says nothing about seconds.
    assert epoch_line(3, 5, 1.0, 0.75, 0.0, 0.0) == "epoch 3/5: loss 1.0000, validation 0.7500"
