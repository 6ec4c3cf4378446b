from __future__ import annotations

import json
from pathlib import Path

from bmcell.studyreport import Effort, RoundResult, table1_rows, write_all


def results(accs: list[float], added: list[int]) -> list[RoundResult]:
    return [
        RoundResult(
            round=i,
            test_accuracy=a,
            validation_accuracy=a,
            added=n,
            added_by_class={"Seg": n // 2, "MB": n - n // 2},
        )
        for i, (a, n) in enumerate(zip(accs, added, strict=True))
    ]


def test_table1_accumulates_additions() -> None:
    rows = table1_rows(
        {
            "cst": results([0.8, 0.85, 0.9], [0, 100, 50]),
            "al": results([0.8, 0.82, 0.84], [0, 10, 20]),
        }
    )
    assert [r["cst added"] for r in rows] == [0, 100, 150]
    assert [r["al added"] for r in rows] == [0, 10, 30]
    assert rows[2]["cst accuracy"] == 0.9


def test_write_all_outputs(tmp_path: Path) -> None:
    by = {
        "cst": results([0.8, 0.85, 0.9, 0.91], [0, 100, 50, 40]),
        "al": results([0.8, 0.82, 0.84, 0.83], [0, 10, 20, 5]),
        "cst+al": results([0.8, 0.86, 0.9, 0.93], [0, 110, 70, 45]),
    }
    written = write_all(by, {"cst": Effort(reviews=190, confirms=180, corrections=10)}, tmp_path)
    assert (tmp_path / "figure1.png").stat().st_size > 10_000
    stats = json.loads((tmp_path / "statistics.json").read_text())
    assert set(stats["groups"]) == {"cst", "al", "cst+al"} and len(stats["pairs"]) == 3
    assert "| round |" in (tmp_path / "table1.md").read_text()
    per_class = (tmp_path / "per_class.csv").read_text().splitlines()
    assert per_class[0].startswith("strategy,") and "cst,95,95,190" in per_class[1:]
    assert set(written) >= {"table1.md", "figure1.png", "effort.csv", "rounds.json"}
