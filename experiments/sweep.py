"""A sweep of the distillation temperature and alpha: ``run_sweep``.

    .venv/bin/python -m experiments.sweep --config=experiments/configs/digits.py:quick \\
        --workdir=/tmp/sweep
    .venv/bin/python -m experiments.sweep --config=experiments/configs/digits.py:quick \\
        --workdir=/tmp/sweep --mode=random --num_trials=12 --sweep_seed=0 \\
        --temperatures=1,16 --alphas=0.1,1 --select_on=validation

Grid mode trains the distilled student for every (temperature, alpha) pair of
``--temperatures`` and ``--alphas``. Random mode draws ``--num_trials`` pairs from
``--sweep_seed``: the temperature log-uniform and alpha uniform between the smallest
and the largest listed value; trial k's draw depends on the seed and k alone, so a
larger ``--num_trials`` extends a sweep. The teacher and the student from scratch do
not depend on either value: they are trained once per seed and shared by all trials.

The best trial is the one with the highest mean accuracy on the validation split
(``--select_on=validation``, the default: a seeded part of the training split that
no run trains on), or on the test split with ``--select_on=test``; the table shows
both and says which chose. Re-running with the same workdir skips finished trials
and resumes unfinished runs from their checkpoints; runs made with another config
are refused unless ``--overwrite`` deletes them.

Workdir layout::

    WORKDIR/seed_<s>/teacher/, WORKDIR/seed_<s>/scratch/  shared by every trial
    WORKDIR/trial_<k>/seed_<s>/distilled/                 a trial's students
    WORKDIR/trial_<k>/trial.json, result.json             its values; its summary when done
    WORKDIR/sweep.md, sweep.json, sweep_heatmap.png
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

import jaxkd
from experiments import checks, jsonfiles, report, train
from experiments.errors import ExperimentError, run_command

MODES = ("grid", "random")
SELECT_ON = ("validation", "test")
# The result key each selection split ranks trials by.
_SELECTION_KEY = {"validation": "validation_accuracy", "test": "accuracy"}


def sweep_points(
    mode: str,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    *,
    num_trials: int | None = None,
    sweep_seed: int = 0,
) -> list[tuple[float, float]]:
    """The ``(temperature, alpha)`` of every trial; ``ValueError`` naming a bad value."""

    def fail(message):
        raise ExperimentError(f"Bad sweep: {message}")

    if mode not in MODES:
        fail(f"mode={mode!r} is unknown; known: {MODES}.")
    temperatures, alphas = [float(v) for v in temperatures], [float(v) for v in alphas]
    for name, values in (("temperatures", temperatures), ("alphas", alphas)):
        if not values:
            fail(f"{name} is empty.")
    if not all(value > 0 for value in temperatures):
        fail(f"temperatures={temperatures}: every temperature must be > 0.")
    if not all(0.0 <= value <= 1.0 for value in alphas):
        fail(f"alphas={alphas}: every alpha must lie in [0, 1].")
    if mode == "grid":
        if num_trials is not None:
            fail(f"num_trials={num_trials} applies to mode='random' only.")
        return [(t, a) for t in dict.fromkeys(temperatures) for a in dict.fromkeys(alphas)]
    if num_trials is None or num_trials < 1:
        fail(f"num_trials={num_trials} must be >= 1 in mode='random'.")
    if sweep_seed < 0:
        fail(f"sweep_seed={sweep_seed} must be >= 0.")
    low, high = min(temperatures), max(temperatures)
    points = []
    for trial in range(num_trials):
        rng = np.random.default_rng([sweep_seed, trial])
        log_temperature = rng.uniform(np.log(low), np.log(high))
        alpha = rng.uniform(min(alphas), max(alphas))
        points.append((float(np.clip(np.exp(log_temperature), low, high)), float(alpha)))
    return points


def _trial_config(config, temperature: float, alpha: float) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.distill.temperature, config.distill.alpha = temperature, alpha
    return config


def plan_sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    select_on: str = "validation",
    overwrite: bool = False,
    **sweep,
) -> list[tuple]:
    """:func:`sweep_points`, after checking the selection split, every trial's config
    and the workdir's trials (a trial of another sweep is refused, or deleted with
    ``overwrite``)."""
    if select_on not in SELECT_ON:
        raise ExperimentError(f"Bad sweep: select_on={select_on!r} is unknown; known: {SELECT_ON}.")
    if select_on == "validation" and not config.validation_fraction > 0:
        raise ExperimentError(
            "Bad sweep: select_on='validation' needs a validation split "
            f"(validation_fraction={config.validation_fraction} must be > 0)."
        )
    points = sweep_points(**sweep)
    for temperature, alpha in points:
        checks.validate_config(_trial_config(config, temperature, alpha), jax.device_count())
    checks.check_workdir(workdir)
    for index, point in enumerate(points):
        trialdir = os.path.join(workdir, f"trial_{index}")
        planned = jsonfiles.read(os.path.join(trialdir, "trial.json"))
        if planned and (planned["temperature"], planned["alpha"]) != point:
            if not overwrite:
                raise ExperimentError(
                    f"Bad sweep: {trialdir} holds temperature={planned['temperature']}, "
                    f"alpha={planned['alpha']}, not {point}; use another workdir for "
                    "another sweep, or --overwrite to delete its trials."
                )
            if jax.process_index() == 0:
                shutil.rmtree(trialdir)
    return points


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mode: str,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    num_trials: int | None = None,
    sweep_seed: int = 0,
    select_on: str = "validation",
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Trains the distilled student of every trial; writes the sweep's report.

    Args:
      config: the experiment config; its temperature and alpha are replaced by
        each trial's.
      workdir: the output directory.
      mode, temperatures, alphas, num_trials, sweep_seed: see :func:`sweep_points`.
      select_on: the split whose mean accuracy picks the best trial,
        ``"validation"`` or ``"test"``.
      overwrite: delete and train again the runs made with another config
        instead of refusing.

    Raises ``ExperimentError`` for a bad sweep value, config field or workdir before
    any training.

    Returns:
      One record per trial: ``trial``, ``temperature``, ``alpha``, per-run ``runs`` and,
      for every result column, ``{"mean", "std", "values"}`` over the config's seeds.
    """
    sweep = dict(mode=mode, temperatures=temperatures, alphas=alphas)
    sweep.update(num_trials=num_trials, sweep_seed=sweep_seed)
    points = plan_sweep(config, workdir, select_on=select_on, overwrite=overwrite, **sweep)
    is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    experiment = train.Experiment(config, workdir)
    seeds = [int(seed) for seed in config.seeds]
    planned = {
        experiment.rundir(kind, seed): experiment.run_fields(kind, seed)
        for seed in seeds
        for kind in ("teacher", "scratch")
    }
    for index, (temperature, alpha) in enumerate(points):
        trial_config = _trial_config(config, temperature, alpha)
        for seed in seeds:
            rundir = os.path.join(workdir, f"trial_{index}", f"seed_{seed}", "distilled")
            planned[rundir] = experiment.run_fields("distilled", seed, trial_config)
    experiment.check_runs(planned, overwrite=overwrite)
    if is_chief:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
    supervised = jaxkd.cross_entropy_objective()
    teacher_model, student_model = experiment.model("teacher"), experiment.model("student")
    teacher_apply = jaxkd.linen_teacher_apply(teacher_model)
    teacher_run = dict(steps=config.teacher.steps, learning_rate=config.teacher.learning_rate)
    student_run = dict(steps=config.steps, learning_rate=config.learning_rate)
    references, teachers = [], {}
    for seed in seeds:  # once for all trials
        result, state = experiment.run("teacher", seed, teacher_model, supervised, **teacher_run)
        teachers[seed] = (teacher_apply, {"params": state.params, **state.model_state})
        scratch, _ = experiment.run(
            "scratch", seed, student_model, supervised, teacher=teachers[seed], **student_run
        )
        references += [result, scratch]

    trials = []
    for index, (temperature, alpha) in enumerate(tqdm(points, desc="sweep", disable=not is_chief)):
        trialdir = os.path.join(workdir, f"trial_{index}")
        record = {"trial": index, "temperature": temperature, "alpha": alpha}
        os.makedirs(trialdir, exist_ok=True)
        if is_chief:
            jsonfiles.write(os.path.join(trialdir, "trial.json"), record)
        trial_config = _trial_config(config, temperature, alpha)
        # Finished runs are read back, not trained again.
        objective = jaxkd.distillation_objective(
            config.distill.loss,
            alpha=alpha,
            temperature=temperature,
            loss_kwargs=config.distill.loss_kwargs.to_dict(),
        )
        distilled = dict(model=student_model, objective=objective, **student_run)
        runs = [
            experiment.run(
                "distilled",
                seed,
                teacher=teachers[seed],
                rundir=os.path.join(trialdir, f"seed_{seed}", "distilled"),
                fields=experiment.run_fields("distilled", seed, trial_config),
                **distilled,
            )[0]
            for seed in seeds
        ]
        record = {**record, **report.summarize(runs)["distilled"], "runs": runs}
        if is_chief:
            jsonfiles.write(os.path.join(trialdir, "result.json"), record)
        trials.append(record)

    if is_chief:
        reference = report.summarize(references)
        best = best_trial(trials, select_on)
        title = (
            f"{config.dataset}: {config.distill.loss} distillation, {mode} sweep of "
            f"{len(points)} trials, {config.steps} student steps, seeds {seeds}"
        )
        note = (
            f"Best trial: {best['trial']} (T={best['temperature']:.3g}, "
            f"alpha={best['alpha']:.3g}), chosen on the {select_on} split "
            f"(highest mean {select_on} accuracy). "
            + report.data_note(experiment.data_sizes, config.validation_fraction, kl=False)
        )
        with open(os.path.join(workdir, "sweep.md"), "w") as f:
            f.write(f"# {title}\n\n{note}\n\n{sweep_table(trials, reference, select_on)}\n")
        summary = {"title": title, **sweep, "temperatures": [float(t) for t in temperatures]}
        summary.update(alphas=[float(a) for a in alphas], select_on=select_on)
        summary.update(best_trial=best["trial"], examples=experiment.data_sizes)
        summary.update(reference=reference, references=references, trials=trials)
        jsonfiles.write(os.path.join(workdir, "sweep.json"), summary)
        plot_sweep(trials, mode, os.path.join(workdir, "sweep_heatmap.png"), select_on)
    return trials


def best_trial(trials: Sequence[dict[str, Any]], select_on: str = "validation") -> dict[str, Any]:
    """The trial with the highest mean accuracy on the ``select_on`` split (the first
    of equals)."""
    key = _SELECTION_KEY[select_on]
    return max(trials, key=lambda trial: trial[key]["mean"])


def sweep_table(
    trials: Sequence[dict[str, Any]], reference: dict[str, Any], select_on: str = "validation"
) -> str:
    """A markdown table: one row per trial, then the scratch student and the teacher.

    The best trial on the ``select_on`` split is marked ``(best on <split>)``.
    """
    keys = ("validation_accuracy", "accuracy", "agreement")
    lines = [
        "| trial | temperature | alpha | validation accuracy | test accuracy "
        "| agreement w/ teacher |",
        "|---|---|---|---|---|---|",
    ]
    best = best_trial(trials, select_on)
    for trial in trials:
        name = str(trial["trial"])
        if trial is best:
            name = f"**{name}** (best on {select_on})"
        cells = [name, f"{trial['temperature']:.3g}", f"{trial['alpha']:.3g}"]
        cells += [report.format_mean_std(trial[key]) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    for kind in ("scratch", "teacher"):
        cells = [report.RUN_TITLES[kind], "–", "–"]
        cells += [report.format_mean_std(reference[kind][key]) for key in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sweep(
    trials: Sequence[dict[str, Any]], mode: str, path: str, select_on: str = "validation"
) -> None:
    """Mean accuracy on the ``select_on`` split: for a grid a temperature x alpha
    heatmap, for random draws a colored scatter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    key = _SELECTION_KEY[select_on]
    accuracy = {(t["temperature"], t["alpha"]): t[key]["mean"] for t in trials}
    fig, ax = plt.subplots(figsize=(6, 4.5))
    if mode == "grid":
        temperatures = sorted({t for t, _ in accuracy})
        alphas = sorted({a for _, a in accuracy})
        grid = np.full((len(temperatures), len(alphas)), np.nan)
        for (temperature, alpha), value in accuracy.items():
            grid[temperatures.index(temperature), alphas.index(alpha)] = value
        image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        for (row, column), value in np.ndenumerate(grid):
            color = "white" if image.norm(value) < 0.6 else "black"
            ax.text(column, row, f"{value:.3f}", ha="center", va="center", color=color)
        ax.set_xticks(range(len(alphas)), [f"{a:.3g}" for a in alphas])
        ax.set_yticks(range(len(temperatures)), [f"{t:.3g}" for t in temperatures])
        ax.set(xlabel="alpha", ylabel="temperature")
    else:
        (temperatures, alphas), values = zip(*accuracy, strict=True), list(accuracy.values())
        image = ax.scatter(temperatures, alphas, c=values, cmap="viridis", s=60)
        for point, value in accuracy.items():
            ax.annotate(f"{value:.3f}", point, xytext=(4, 4), textcoords="offset points")
        ax.set(xscale="log", xlabel="temperature", ylabel="alpha")
        ax.xaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(ticker.FormatStrFormatter("%g"))
        ax.grid(alpha=0.3)
    ax.set_title(f"distilled student: {select_on} accuracy (mean over seeds)")
    fig.colorbar(image, ax=ax, label=f"{select_on} accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# Command line -----------------------------------------------------------------


def _define_flags() -> None:
    """Only when run as a program, so that importing the module registers no flags."""
    config_flags.DEFINE_config_file("config", None, "Path to an experiment config.")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
    flags.DEFINE_string("mode", "grid", f"One of {MODES}.")
    flags.DEFINE_list("temperatures", "1,2,4,8", "Temperatures (> 0).")
    flags.DEFINE_list("alphas", "0.5,0.9", "Weights of the distillation term in [0, 1].")
    flags.DEFINE_integer("num_trials", None, "Trials of mode=random.")
    flags.DEFINE_integer("sweep_seed", 0, "Seed of the draws of mode=random.")
    flags.DEFINE_enum(
        "select_on", "validation", list(SELECT_ON), "The split whose accuracy picks the best trial."
    )
    flags.DEFINE_bool(
        "overwrite", False, "Delete and train again the runs made with another config."
    )
    flags.mark_flags_as_required(["config", "workdir"])


def _floats(name: str, values: Sequence[str]) -> list[float]:
    try:
        return [float(value) for value in values]
    except ValueError:
        raise ExperimentError(f"Bad sweep: {name}={list(values)} must be numbers.") from None


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep checkpoint chatter off the console
    FLAGS = flags.FLAGS
    config, workdir = FLAGS.config, FLAGS.workdir
    sweep = dict(mode=FLAGS.mode, num_trials=FLAGS.num_trials, sweep_seed=FLAGS.sweep_seed)
    sweep.update(select_on=FLAGS.select_on, overwrite=FLAGS.overwrite)

    def sweep_from_flags():
        sweep["temperatures"] = _floats("temperatures", FLAGS.temperatures)
        sweep["alphas"] = _floats("alphas", FLAGS.alphas)
        run_sweep(config, workdir, **sweep)

    run_command(sweep_from_flags)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "sweep.md")) as f:
            print(f.read())
        print(f"Sweep results, runs and heatmap in {os.path.abspath(workdir)}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
