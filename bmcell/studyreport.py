"""The study's outputs for a strategy comparison: Table 1, Figure 1, per-class
additions, human effort and the statistics (one-way ANOVA, Tukey HSD).

Input is plain data gathered from each strategy's rounds, so the experiment runner
and tests share it: per strategy, a list of ``RoundResult`` in round order.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bmcell.evaluation import anova_tukey


@dataclass(frozen=True)
class RoundResult:
    round: int
    test_accuracy: float
    validation_accuracy: float
    added: int
    added_by_class: dict[str, int] = field(default_factory=dict)
    promoted: bool = True


@dataclass(frozen=True)
class Effort:
    reviews: int = 0
    confirms: int = 0
    corrections: int = 0
    difficult: int = 0


def cumulative(results: list[RoundResult]) -> list[int]:
    return [int(x) for x in np.cumsum([r.added for r in results])]


def table1_rows(by_strategy: Mapping[str, list[RoundResult]]) -> list[dict]:
    """One row per round: accuracy and cumulative added labels for every strategy."""
    rounds = sorted({r.round for results in by_strategy.values() for r in results})
    rows = []
    for n in rounds:
        row: dict[str, object] = {"round": n}
        for strategy, results in by_strategy.items():
            cum = dict(zip([r.round for r in results], cumulative(results), strict=True))
            hit = next((r for r in results if r.round == n), None)
            row[f"{strategy} accuracy"] = None if hit is None else round(hit.test_accuracy, 4)
            row[f"{strategy} added"] = cum.get(n)
        rows.append(row)
    return rows


def write_table(rows: list[dict], out: Path, stem: str) -> tuple[Path, Path]:
    cols = list(rows[0]) if rows else ["round"]
    md = out / f"{stem}.md"
    md.write_text(
        "| "
        + " | ".join(cols)
        + " |\n|"
        + "---|" * len(cols)
        + "\n"
        + "".join(
            "| " + " | ".join("" if row[c] is None else str(row[c]) for c in cols) + " |\n"
            for row in rows
        )
    )
    path_csv = out / f"{stem}.csv"
    with path_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    return md, path_csv


def plot_figure1(by_strategy: Mapping[str, list[RoundResult]], path: Path) -> Path:
    """The study's Figure 1: test accuracy and cumulative added labels against round."""
    fig = Figure(figsize=(10, 4), dpi=120)
    FigureCanvasAgg(fig)
    acc_ax, add_ax = fig.subplots(1, 2)
    for strategy, results in by_strategy.items():
        xs = [r.round for r in results]
        acc_ax.plot(xs, [r.test_accuracy for r in results], marker="o", label=strategy)
        add_ax.plot(xs, cumulative(results), marker="o", label=strategy)
    acc_ax.set(title="Test accuracy", xlabel="round", ylabel="accuracy")
    add_ax.set(title="Labels added (cumulative)", xlabel="round", ylabel="cells")
    for ax in (acc_ax, add_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path


def per_class_rows(by_strategy: Mapping[str, list[RoundResult]]) -> list[dict]:
    codes = sorted(
        {c for results in by_strategy.values() for r in results for c in r.added_by_class}
    )
    rows = []
    for strategy, results in by_strategy.items():
        totals = {c: sum(r.added_by_class.get(c, 0) for r in results) for c in codes}
        rows.append({"strategy": strategy, **totals, "total": sum(totals.values())})
    return rows


def statistics(by_strategy: Mapping[str, list[RoundResult]]) -> dict | None:
    """ANOVA and Tukey HSD on per-round accuracies (rounds after the bootstrap)."""
    groups = {
        s: [r.test_accuracy for r in results if r.round > 0] for s, results in by_strategy.items()
    }
    if len(groups) < 2 or any(len(v) < 2 for v in groups.values()):
        return None
    return anova_tukey(groups)


#: A round's states in the order the rounds driver walks them (services/rounds).
STAGES = ("created", "predicting", "selecting", "reviewing", "training", "evaluating")


def cost_rows(
    stages: Mapping[str, list[Mapping[str, float]]], setup: Mapping[str, float] | None = None
) -> list[dict]:
    """Seconds per stage: one row per set-up step (synthesis, uploads, bootstrap), then
    one per strategy and round, with each row's total."""
    rows: list[dict] = []
    for step, seconds in (setup or {}).items():
        blank = dict.fromkeys(STAGES)
        rows.append({"strategy": "setup", "round": step, **blank, "total": round(seconds, 1)})
    for strategy, per_round in stages.items():
        for n, spent in enumerate(per_round, start=1):
            row: dict[str, object] = {"strategy": strategy, "round": n}
            row |= {stage: round(spent.get(stage, 0.0), 1) for stage in STAGES}
            row["total"] = round(sum(spent.values()), 1)
            rows.append(row)
    return rows


def write_all(
    by_strategy: Mapping[str, list[RoundResult]],
    effort: Mapping[str, Effort],
    out: Path,
    *,
    costs: list[dict] | None = None,
) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["table1.md"], written["table1.csv"] = write_table(
        table1_rows(by_strategy), out, "table1"
    )
    written["figure1.png"] = plot_figure1(by_strategy, out / "figure1.png")
    written["per_class.md"], written["per_class.csv"] = write_table(
        per_class_rows(by_strategy), out, "per_class"
    )
    effort_rows = [{"strategy": s, **asdict(e)} for s, e in effort.items()]
    written["effort.md"], written["effort.csv"] = write_table(effort_rows, out, "effort")
    stats = statistics(by_strategy)
    written["statistics.json"] = out / "statistics.json"
    written["statistics.json"].write_text(
        json.dumps(
            stats or {"note": "needs at least two strategies with two rounds each"}, indent=2
        )
    )
    if costs:
        written["costs.md"], written["costs.csv"] = write_table(costs, out, "costs")
    raw = {s: [asdict(r) for r in results] for s, results in by_strategy.items()}
    written["rounds.json"] = out / "rounds.json"
    written["rounds.json"].write_text(json.dumps(raw, indent=2))
    return written
