"""The quickstart prints its three-row table from its own measurements."""

from __future__ import annotations

from experiments import quickstart


def test_quickstart_prints_teacher_scratch_and_distilled(capsys):
    rows = quickstart.main(["--steps", "30"])
    printed = capsys.readouterr().out
    assert [name.split(",")[0] for name, _ in rows] == [
        "teacher MLP 64-256-256-10",
        "student MLP 64-8-10",
        "student MLP 64-8-10",
    ]
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 4  # header + 3 rows
    assert "from scratch" in table[2] and "distilled" in table[3]
    accuracies = [float(line.split("|")[2]) for line in table[1:]]
    assert all(0.0 <= accuracy <= 1.0 for accuracy in accuracies)
