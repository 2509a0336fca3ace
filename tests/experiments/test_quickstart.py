"""The quickstart prints its three-row table and its paired verdict from its own runs."""

from __future__ import annotations

from experiments import quickstart


def test_quickstart_prints_teacher_scratch_and_distilled(capsys):
    rows = quickstart.main(["--steps", "30", "--seeds", "2"])
    printed = capsys.readouterr().out
    assert [name.split(",")[0] for name, _, _ in rows] == [
        "teacher MLP 64-256-256-10",
        "student MLP 64-8-10",
        "student MLP 64-8-10",
    ]
    assert [len(results) for _, results, _ in rows] == [1, 2, 2]
    table = [line for line in printed.splitlines() if line.startswith("| ")]
    assert len(table) == 4  # header + 3 rows
    assert "from scratch" in table[2] and "distilled" in table[3]
    for line in table[1:]:
        mean = float(line.split("|")[2].split("±")[0])
        assert 0.0 <= mean <= 1.0
    assert "±" in table[2] and "±" in table[3]
    assert "distilled better on" in printed and "of 2 seeds" in printed
    assert "Here distillation" in printed
