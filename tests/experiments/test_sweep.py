"""The temperature/alpha sweep: a 2x2 grid sharing one teacher, chosen on the validation
split; random draws; Optuna's TPE proposals (bayes); grid vs random vs bayes; bad values."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import sweep, sweep_compare
from experiments.configs import digits

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GRID = dict(mode="grid", temperatures=[1.0, 4.0], alphas=[0.5, 0.9])


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    config = digits.get_config("quick")
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    config.steps = config.teacher.steps = config.eval_every = config.checkpoint_every = 10
    return config


@pytest.fixture(scope="module")
def grid(config, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    return workdir, sweep.run_sweep(config, str(workdir), **GRID)


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _final_params(rundir):
    manager = ocp.CheckpointManager(str(rundir / "checkpoints"))
    args = ocp.args.Composite(state=ocp.args.StandardRestore())
    params = manager.restore(manager.latest_step(), args=args)["state"]["params"]
    manager.close()
    return params


def test_grid_writes_table_json_and_heatmap(grid):
    workdir, trials = grid
    pairs = [(1.0, 0.5), (1.0, 0.9), (4.0, 0.5), (4.0, 0.9)]
    assert [(t["temperature"], t["alpha"]) for t in trials] == pairs
    for name in ("sweep.md", "sweep.json", "sweep_heatmap.png", "config.json"):
        assert (workdir / name).exists(), name
    table = (workdir / "sweep.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) == 2 + len(pairs) + 2  # header, rule, trials, scratch, teacher
    assert "student from scratch" in table and "| teacher |" in table
    assert "| validation accuracy | test accuracy |" in rows[0]
    saved = json.loads((workdir / "sweep.json").read_text())
    assert [t["accuracy"]["mean"] for t in saved["trials"]] == [
        t["accuracy"]["mean"] for t in trials
    ]
    assert 0.0 <= saved["reference"]["teacher"]["accuracy"]["mean"] <= 1.0
    assert all(0.0 <= t["agreement"]["mean"] <= 1.0 for t in trials)


def test_teacher_and_scratch_are_trained_once_for_all_trials(grid):
    workdir, _ = grid
    for kind in ("teacher", "scratch"):
        assert sorted(workdir.glob(f"**/{kind}")) == [workdir / "seed_0" / kind]
        assert os.listdir(workdir / "seed_0" / kind / "checkpoints") == ["10"]
        records = _read_jsonl(workdir / "seed_0" / kind / "metrics.jsonl")
        assert [r["step"] for r in records if r["split"] == "train"] == [10]
    assert len(list(workdir.glob("trial_*/seed_0/distilled/result.json"))) == 4


def test_each_trial_trains_with_its_own_temperature_and_alpha(grid):
    workdir, trials = grid
    for trial in trials:
        rundir = workdir / f"trial_{trial['trial']}" / "seed_0" / "distilled"
        record = _read_jsonl(rundir / "metrics.jsonl")[0]
        assert record["temperature"] == pytest.approx(trial["temperature"])
        assert record["alpha"] == pytest.approx(trial["alpha"])
    cold, hot = (_final_params(workdir / f"trial_{k}" / "seed_0" / "distilled") for k in (1, 3))
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), cold, hot))
    assert max(differences) > 1e-4


def test_best_trial_is_chosen_on_the_validation_split(grid):
    workdir, trials = grid
    saved = json.loads((workdir / "sweep.json").read_text())
    assert saved["select_on"] == "validation"
    means = [t["validation_accuracy"]["mean"] for t in trials]
    assert saved["best_trial"] == int(np.argmax(means))
    table = (workdir / "sweep.md").read_text()
    assert f"| **{saved['best_trial']}** (best on validation) |" in table
    assert "chosen on the validation split" in table
    # Where the splits disagree, each choice follows its own split.
    made_up = [
        {"trial": 0, "validation_accuracy": {"mean": 0.9}, "accuracy": {"mean": 0.5}},
        {"trial": 1, "validation_accuracy": {"mean": 0.8}, "accuracy": {"mean": 0.7}},
    ]
    assert sweep.best_trial(made_up)["trial"] == 0
    assert sweep.best_trial(made_up, "test")["trial"] == 1


def test_selection_on_validation_needs_a_validation_split(tmp_path, config):
    no_validation = config.copy_and_resolve_references()
    no_validation.validation_fraction = 0.0
    with pytest.raises(ValueError, match="select_on='validation' needs a validation split"):
        sweep.run_sweep(no_validation, str(tmp_path / "run"), **GRID)
    with pytest.raises(ValueError, match="select_on='train' is unknown"):
        sweep.run_sweep(config, str(tmp_path / "run"), **GRID, select_on="train")
    assert not (tmp_path / "run").exists()


def test_rerun_skips_finished_trials_and_finishes_the_others(grid, config):
    workdir, trials = grid
    run = workdir / "trial_0" / "seed_0" / "distilled"
    finished = (run / "result.json").stat().st_mtime_ns, (run / "metrics.jsonl").read_text()
    (workdir / "trial_3" / "seed_0" / "distilled" / "result.json").unlink()  # stopped before it
    again = sweep.run_sweep(config, str(workdir), **GRID)
    assert ((run / "result.json").stat().st_mtime_ns, (run / "metrics.jsonl").read_text()) == (
        finished
    )
    assert [t["accuracy"] for t in again] == [t["accuracy"] for t in trials]
    records = _read_jsonl(workdir / "trial_3" / "seed_0" / "distilled" / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [10]
    with pytest.raises(ValueError, match="trial_0 holds temperature=1.0, alpha=0.5"):
        sweep.run_sweep(config, str(workdir), **{**GRID, "temperatures": [2.0]})


def test_random_draws_are_deterministic_and_within_bounds(tmp_path):
    draw = dict(mode="random", temperatures=[1, 2, 16], alphas=[0.9, 0.2], num_trials=50)
    points = sweep.sweep_points(**draw, sweep_seed=3)
    assert points == sweep.sweep_points(**draw, sweep_seed=3)
    assert points != sweep.sweep_points(**draw, sweep_seed=4)
    assert points[:5] == sweep.sweep_points(**{**draw, "num_trials": 5}, sweep_seed=3)
    temperatures, alphas = np.asarray(points).T
    assert np.all((1 <= temperatures) & (temperatures <= 16) & (0.2 <= alphas) & (alphas <= 0.9))
    assert np.mean(temperatures < 4) > 0.3  # log-uniform: half below sqrt(1 * 16)
    trials = [
        {"temperature": t, "alpha": a, "validation_accuracy": {"mean": a / t}} for t, a in points
    ]
    sweep.plot_sweep(trials, "random", str(tmp_path / "scatter.png"))
    assert (tmp_path / "scatter.png").stat().st_size > 0


BOUNDS = dict(temperatures=[1.0, 16.0], alphas=[0.1, 0.9])


def _peak(temperature, alpha):
    """A made-up selection accuracy, highest at T=4, alpha=0.7."""
    return 1.0 - np.log(temperature / 4.0) ** 2 - (alpha - 0.7) ** 2


def _distance_to_peak(points):
    return np.mean([abs(np.log(t / 4.0)) + abs(a - 0.7) for t, a, *_ in points])


def _bayes_history(objective, num_trials, **options):
    """``(temperature, alpha, value)`` of a bayes sweep of ``objective``, without training."""
    history = []
    for _ in range(num_trials):
        temperature, alpha = sweep.propose_bayes(history, **BOUNDS, **options)
        history.append((temperature, alpha, objective(temperature, alpha)))
    return history


def test_bayes_proposals_depend_on_the_seed_and_the_results_alone():
    options = dict(sweep_seed=3, startup_trials=3)
    history = _bayes_history(_peak, 12, **options)
    assert history == _bayes_history(_peak, 12, **options)  # two fresh studies
    other_seed = _bayes_history(_peak, 12, sweep_seed=4, startup_trials=3)
    assert [h[:2] for h in other_seed] != [h[:2] for h in history]
    temperatures, alphas, _ = np.asarray(history).T
    assert np.all((1 <= temperatures) & (temperatures <= 16) & (0.1 <= alphas) & (alphas <= 0.9))
    # The startup trials are random draws, blind to the results; TPE's are not.
    flat = _bayes_history(lambda t, a: 0.5, 4, **options)
    assert [h[:2] for h in flat[:3]] == [h[:2] for h in history[:3]]
    assert flat[3][:2] != history[3][:2]
    # TPE maximizes: after the same 16 trials, its proposals (8 seeds) lie nearer the
    # best of them than the trials do, and far nearer than when the values are negated.
    draws = sweep.sweep_points("random", **BOUNDS, num_trials=16)
    scored = [(t, a, _peak(t, a)) for t, a in draws]
    negated = [(t, a, -value) for t, a, value in scored]
    proposals, avoiding = (
        [sweep.propose_bayes(trials, **BOUNDS, sweep_seed=s, startup_trials=3) for s in range(8)]
        for trials in (scored, negated)
    )
    assert _distance_to_peak(proposals) < 0.8 * _distance_to_peak(draws)
    assert _distance_to_peak(proposals) < 0.5 * _distance_to_peak(avoiding)
    # A trial that measured nothing (null in result.json, NaN) is left out, not an error.
    lost = [(2.0, 0.5, None), (3.0, 0.6, float("nan"))]
    assert sweep.propose_bayes(lost, **BOUNDS, startup_trials=0) != (2.0, 0.5)
    with pytest.raises(ValueError, match="proposes each trial from the results"):
        sweep.sweep_points("bayes", **BOUNDS, num_trials=3)


COMPARED = dict(temperatures=[1.0, 4.0], alphas=[0.5, 0.9])


@pytest.fixture(scope="module")
def comparison(config, grid, tmp_path_factory):
    """Grid, random and bayes sweeps of 2 trials each, with the grid's teacher and scratch."""
    workdir = tmp_path_factory.mktemp("compare")
    shutil.copytree(grid[0] / "seed_0", workdir / "seed_0")  # copy2 keeps the mtimes
    teacher = (workdir / "seed_0" / "teacher" / "result.json").stat().st_mtime_ns
    results = sweep_compare.run_comparison(
        config, str(workdir), **COMPARED, num_trials=2, startup_trials=1
    )
    return workdir, results, teacher


def test_comparison_writes_one_row_per_method_with_its_best_trial(comparison):
    workdir, results, teacher = comparison
    for name in ("sweep_compare.md", "sweep_compare.json", "sweep_compare.png"):
        assert (workdir / name).exists(), name
    for method in sweep_compare.METHODS:
        assert (workdir / method / "sweep.md").exists(), method
    # The three methods share the teacher and the student from scratch, not trained again.
    assert sorted(workdir.glob("**/teacher")) == [workdir / "seed_0" / "teacher"]
    assert sorted(workdir.glob("**/scratch")) == [workdir / "seed_0" / "scratch"]
    assert (workdir / "seed_0" / "teacher" / "result.json").stat().st_mtime_ns == teacher
    points = {m: [(t["temperature"], t["alpha"]) for t in trials] for m, trials in results.items()}
    assert points["grid"] == [(1.0, 0.7), (4.0, 0.7)]  # a 2x1 grid spanning the ranges
    assert points["random"] == sweep.sweep_points("random", **COMPARED, num_trials=2)
    assert points["bayes"] != points["random"]
    rows = [line for line in (workdir / "sweep_compare.md").read_text().splitlines() if "|" in line]
    assert len(rows) == 2 + 3  # header, rule, one row per method
    assert "| best validation accuracy | its T, alpha | test accuracy of that trial |" in rows[0]
    saved = json.loads((workdir / "sweep_compare.json").read_text())["methods"]
    for row, method in zip(rows[2:], sweep_compare.METHODS, strict=True):
        trials = results[method]
        means = [t["validation_accuracy"]["mean"] for t in trials]
        best = trials[int(np.argmax(means))]
        curve = saved[method]["best_so_far"]
        assert curve == [max(means[: k + 1]) for k in range(len(means))]
        assert saved[method]["best_trial"] == best["trial"]
        cells = [f"{best['validation_accuracy']['mean']:.4f}", f"{best['accuracy']['mean']:.4f}"]
        assert row == (
            f"| {method} | 2 | {cells[0]} | T={best['temperature']:.3g}, "
            f"alpha={best['alpha']:.3g} | {cells[1]} | {curve[0]:.4f}, {curve[1]:.4f} |"
        )


def test_bayes_sweep_resumes_proposing_after_its_finished_trials(comparison, config):
    workdir, results, _ = comparison
    bayes = dict(mode="bayes", **COMPARED, startup_trials=1)

    def runs(trial):
        return workdir / "bayes" / f"trial_{trial}" / "seed_0" / "distilled"

    finished = [(runs(k) / "result.json").stat().st_mtime_ns for k in (0, 1)]
    trials = sweep.run_sweep(
        config, str(workdir / "bayes"), **bayes, num_trials=3, shared_workdir=str(workdir)
    )
    assert [(runs(k) / "result.json").stat().st_mtime_ns for k in (0, 1)] == finished
    assert [t["accuracy"] for t in trials[:2]] == [t["accuracy"] for t in results["bayes"]]
    records = _read_jsonl(runs(2) / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "train"] == [10]
    assert records[0]["temperature"] == pytest.approx(trials[2]["temperature"])
    # Each trial is TPE's proposal given the results before it, within the ranges.
    history = [(t["temperature"], t["alpha"], t["validation_accuracy"]["mean"]) for t in trials]
    for k, (temperature, alpha, _) in enumerate(history):
        assert (temperature, alpha) == sweep.propose_bayes(
            history[:k], **COMPARED, startup_trials=1
        )
        assert 1.0 <= temperature <= 4.0 and 0.5 <= alpha <= 0.9
    saved = json.loads((workdir / "bayes" / "sweep.json").read_text())
    assert (saved["mode"], saved["startup_trials"], len(saved["trials"])) == ("bayes", 1, 3)
    assert saved["optuna"] and "multivariate TPE" in (workdir / "bayes" / "sweep.md").read_text()
    # Another seed proposes other points: refused before any training.
    with pytest.raises(ValueError, match="trial_0 holds temperature="):
        sweep.run_sweep(config, str(workdir / "bayes"), **bayes, num_trials=3, sweep_seed=1)


@pytest.mark.parametrize(
    "changes, match",
    [
        (
            dict(temperatures=[0.0, 2.0]),
            r"temperatures=\[0.0, 2.0\]: every temperature must be > 0",
        ),
        (dict(temperatures=[-1.0]), "every temperature must be > 0"),
        (dict(alphas=[0.5, 1.5]), r"alphas=\[0.5, 1.5\]: every alpha must lie in \[0, 1\]"),
        (dict(alphas=[-0.1]), r"every alpha must lie in \[0, 1\]"),
        (dict(temperatures=[]), "temperatures is empty"),
        (dict(alphas=[]), "alphas is empty"),
        (dict(mode="annealing"), "mode='annealing' is unknown"),
        (dict(mode="random", num_trials=0), "num_trials=0 must be >= 1"),
        (dict(mode="random"), "num_trials=None must be >= 1"),
        (dict(mode="bayes"), "num_trials=None must be >= 1 in mode='bayes'"),
        (dict(num_trials=5), r"num_trials=5 must lie in \[1, 4\], the grid's size"),
        (dict(startup_trials=2), "startup_trials=2 applies to mode='bayes' only"),
        (dict(mode="bayes", num_trials=2, startup_trials=-1), "startup_trials=-1 must be >= 0"),
        (dict(mode="bayes", num_trials=2, sweep_seed=-1), "sweep_seed=-1 must be >= 0"),
    ],
)
def test_bad_sweep_values_stop_before_training(tmp_path, config, changes, match):
    with pytest.raises(ValueError, match=match):
        sweep.run_sweep(config, str(tmp_path / "run"), **{**GRID, **changes})
    assert not (tmp_path / "run").exists()


def test_bad_sweep_value_from_the_command_line_exits_with_a_message(tmp_path):
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "experiments.sweep",
            "--config=experiments/configs/digits.py:quick",
            f"--workdir={tmp_path / 'run'}",
            "--alphas=0.5,2",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert "alphas=[0.5, 2.0]" in completed.stderr
    assert not (tmp_path / "run").exists()
