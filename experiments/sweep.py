"""A sweep of the distillation temperature and alpha: ``run_sweep``.

    .venv/bin/python -m experiments.sweep --config=experiments/configs/digits.py:quick \\
        --workdir=/tmp/sweep
    .venv/bin/python -m experiments.sweep --config=experiments/configs/digits.py:quick \\
        --workdir=/tmp/sweep --mode=random --num_trials=12 --sweep_seed=0 \\
        --temperatures=1,16 --alphas=0.1,1 --select_on=validation
    .venv/bin/python -m experiments.sweep --config=experiments/configs/digits.py:quick \\
        --workdir=/tmp/sweep --mode=bayes --num_trials=12 --sweep_seed=0 \\
        --temperatures=1,16 --alphas=0.1,1

Grid mode trains the distilled student for every (temperature, alpha) pair of
``--temperatures`` and ``--alphas`` (the first ``--num_trials`` of them, if given).
Random mode draws ``--num_trials`` pairs from ``--sweep_seed``: the temperature
log-uniform and alpha uniform between the smallest and the largest listed value;
trial k's draw depends on the seed and k alone, so a larger ``--num_trials`` extends
a sweep. Bayes mode searches the same ranges with Optuna's tree-structured Parzen
estimator (TPE): trial k's proposal depends on the seed, k and the values and results
of the trials before it alone (each proposal comes from a fresh in-memory study
replayed from them), so a rerun proposes what the first run did, and a larger
``--num_trials`` extends a sweep too. Its first ``--startup_trials`` trials are random
draws. The teacher and the student from scratch do not depend on either value: they
are trained once per seed and shared by all trials.

The best trial is the one with the highest mean accuracy on the validation split
(``--select_on=validation``, the default: a seeded part of the training split that
no run trains on), or on the test split with ``--select_on=test``; bayes mode
maximizes that same accuracy. The table shows both and says which chose. Re-running
with the same workdir skips finished trials and resumes unfinished runs from their
checkpoints; runs made with another config, and trials of another sweep, are refused
unless ``--overwrite`` deletes them.

Workdir layout::

    WORKDIR/seed_<s>/teacher/, WORKDIR/seed_<s>/scratch/  shared by every trial
    WORKDIR/trial_<k>/seed_<s>/distilled/                 a trial's students
    WORKDIR/trial_<k>/trial.json, result.json             its values; its summary when done
    WORKDIR/sweep.md, sweep.json, sweep_heatmap.png

References:
  Bergstra, Bardenet, Bengio and Kégl, "Algorithms for Hyper-Parameter Optimization",
  NeurIPS 2011 (TPE), https://papers.nips.cc/paper/4443-algorithms-for-hyper-parameter-optimization
  Falkner, Klein and Hutter, "BOHB: Robust and Efficient Hyperparameter Optimization at
  Scale", ICML 2018 (multivariate TPE), https://proceedings.mlr.press/v80/falkner18a.html
  Akiba, Sano, Yanase, Ohta and Koyama, "Optuna: A Next-generation Hyperparameter
  Optimization Framework", KDD 2019, https://arxiv.org/abs/1907.10902
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm.auto import tqdm

import jaxkd
from experiments import checks, jsonfiles, methods, report, train
from experiments.errors import ExperimentError, run_command

MODES = ("grid", "random", "bayes")
SELECT_ON = ("validation", "test")
# Random proposals before TPE takes over in mode="bayes" (Optuna's own default, 10,
# would leave a sweep of a dozen trials almost random).
STARTUP_TRIALS = 4
# The result key each selection split ranks trials by.
SELECTION_KEY = {"validation": "validation_accuracy", "test": "accuracy"}


def check_sweep(
    mode: str,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    *,
    num_trials: int | None = None,
    sweep_seed: int = 0,
    startup_trials: int | None = None,
) -> tuple[list[float], list[float]]:
    """``(temperatures, alphas)`` as floats; ``ExperimentError`` naming a bad value.

    Args:
      mode: ``"grid"``, ``"random"`` or ``"bayes"``.
      temperatures: the grid's temperatures (> 0); in the other modes their smallest
        and largest value bound the search.
      alphas: the same for alpha, in [0, 1].
      num_trials: grid: the first ``num_trials`` points (default all); random and
        bayes: how many trials (required, >= 1).
      sweep_seed: the seed of the random draws and of TPE (>= 0).
      startup_trials: bayes only: random proposals before TPE (>= 0; default
        ``STARTUP_TRIALS``).
    """

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
    if sweep_seed < 0:
        fail(f"sweep_seed={sweep_seed} must be >= 0.")
    if mode == "grid":
        size = len(set(temperatures)) * len(set(alphas))
        if num_trials is not None and not 1 <= num_trials <= size:
            fail(f"num_trials={num_trials} must lie in [1, {size}], the grid's size.")
    elif num_trials is None or num_trials < 1:
        fail(f"num_trials={num_trials} must be >= 1 in mode={mode!r}.")
    if startup_trials is not None:
        if mode != "bayes":
            fail(f"startup_trials={startup_trials} applies to mode='bayes' only.")
        if startup_trials < 0:
            fail(f"startup_trials={startup_trials} must be >= 0.")
    return temperatures, alphas


def sweep_points(
    mode: str,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    *,
    num_trials: int | None = None,
    sweep_seed: int = 0,
) -> list[tuple[float, float]]:
    """The ``(temperature, alpha)`` of every trial of a grid or random sweep (see
    :func:`check_sweep`); ``ExperimentError`` naming a bad value. A bayes sweep's
    trials depend on the results before them: see :func:`propose_bayes`."""
    sweep = dict(num_trials=num_trials, sweep_seed=sweep_seed)
    temperatures, alphas = check_sweep(mode, temperatures, alphas, **sweep)
    if mode == "bayes":
        raise ExperimentError(
            "Bad sweep: mode='bayes' proposes each trial from the results of the trials "
            "before it; see propose_bayes."
        )
    if mode == "grid":
        points = [(t, a) for t in dict.fromkeys(temperatures) for a in dict.fromkeys(alphas)]
        return points[:num_trials]
    low, high = min(temperatures), max(temperatures)
    points = []
    for trial in range(num_trials):
        rng = np.random.default_rng([sweep_seed, trial])
        log_temperature = rng.uniform(np.log(low), np.log(high))
        alpha = rng.uniform(min(alphas), max(alphas))
        points.append((float(np.clip(np.exp(log_temperature), low, high)), float(alpha)))
    return points


def propose_bayes(
    history: Sequence[tuple[float, float, float | None]],
    *,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    sweep_seed: int = 0,
    startup_trials: int = STARTUP_TRIALS,
) -> tuple[float, float]:
    """The ``(temperature, alpha)`` of trial ``len(history)`` of a bayes sweep.

    A fresh in-memory Optuna study is given the earlier trials and asked for the
    next: multivariate TPE over the temperature, log-uniform on
    ``[min(temperatures), max(temperatures)]``, and alpha, uniform on
    ``[min(alphas), max(alphas)]``, maximizing the recorded value. Its sampler is
    seeded with ``(sweep_seed, len(history))``, so the proposal depends on these
    arguments alone: the same history proposes the same point, in a rerun or in
    another process. The first ``startup_trials`` proposals are random draws.

    Args:
      history: ``(temperature, alpha, value)`` of trials ``0 .. k-1``, in order;
        ``value`` is the maximized metric, or None (or NaN) for a trial that measured
        none, which TPE then ignores.
      temperatures, alphas: the search's bounds are their smallest and largest values.
      sweep_seed: the seed (>= 0).
      startup_trials: random proposals before TPE (>= 0).

    Raises:
      ExperimentError: a bad bound, seed or startup_trials, or no optuna.
    """
    sweep = dict(num_trials=len(history) + 1, sweep_seed=sweep_seed, startup_trials=startup_trials)
    temperatures, alphas = check_sweep("bayes", temperatures, alphas, **sweep)
    try:
        import optuna
    except ImportError:
        raise ExperimentError(
            "Bad sweep: mode='bayes' needs optuna (pip install optuna)."
        ) from None
    distributions = {
        "temperature": optuna.distributions.FloatDistribution(
            min(temperatures), max(temperatures), log=True
        ),
        "alpha": optuna.distributions.FloatDistribution(min(alphas), max(alphas)),
    }
    seed = int(np.random.SeedSequence([sweep_seed, len(history)]).generate_state(1)[0])
    sampler = optuna.samplers.TPESampler(
        seed=seed, n_startup_trials=startup_trials, multivariate=True
    )
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per study
    try:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for temperature, alpha, value in history:
            measured = value is not None and math.isfinite(value)
            state = optuna.trial.TrialState.COMPLETE if measured else optuna.trial.TrialState.FAIL
            trial = optuna.trial.create_trial(
                params={"temperature": float(temperature), "alpha": float(alpha)},
                distributions=distributions,
                value=float(value) if measured else None,
                state=state,
            )
            study.add_trial(trial)
        params = study.ask(distributions).params
    finally:
        optuna.logging.set_verbosity(verbosity)
    return float(params["temperature"]), float(params["alpha"])


def _trial_config(config, temperature: float, alpha: float) -> ml_collections.ConfigDict:
    config = config.copy_and_resolve_references()
    config.distill.temperature, config.distill.alpha = temperature, alpha
    return config


def _history(
    trials: Sequence[dict[str, Any]], select_on: str
) -> list[tuple[float, float, float | None]]:
    """``(temperature, alpha, mean selection accuracy)`` of trial records or results."""
    key = SELECTION_KEY[select_on]
    return [(t["temperature"], t["alpha"], t[key]["mean"]) for t in trials]


def _claim_trialdir(trialdir: str, point: tuple[float, float], *, overwrite: bool) -> None:
    """Refuses (or, with ``overwrite``, deletes) a trial directory planned for another
    ``(temperature, alpha)``."""
    planned = jsonfiles.read(os.path.join(trialdir, "trial.json"))
    if planned and (planned["temperature"], planned["alpha"]) != tuple(point):
        if not overwrite:
            raise ExperimentError(
                f"Bad sweep: {trialdir} holds temperature={planned['temperature']}, "
                f"alpha={planned['alpha']}, not {tuple(point)}; use another workdir for "
                "another sweep, or --overwrite to delete its trials."
            )
        if jax.process_index() == 0:
            shutil.rmtree(trialdir)


def plan_sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mode: str,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    num_trials: int | None = None,
    sweep_seed: int = 0,
    startup_trials: int | None = None,
    select_on: str = "validation",
    overwrite: bool = False,
) -> list[tuple[float, float]]:
    """The ``(temperature, alpha)`` of the trials known before training, after checking
    the sweep, the selection split, the trials' configs and the workdir's trials (a
    trial of another sweep is refused, or deleted with ``overwrite``).

    Grid and random: every trial (:func:`sweep_points`). Bayes: the proposals for the
    workdir's finished trials, replayed from their results, and for the next trial.
    """
    if select_on not in SELECT_ON:
        raise ExperimentError(f"Bad sweep: select_on={select_on!r} is unknown; known: {SELECT_ON}.")
    if select_on == "validation" and not config.validation_fraction > 0:
        raise ExperimentError(
            "Bad sweep: select_on='validation' needs a validation split "
            f"(validation_fraction={config.validation_fraction} must be > 0)."
        )
    sweep = dict(num_trials=num_trials, sweep_seed=sweep_seed)
    temperatures, alphas = check_sweep(
        mode, temperatures, alphas, **sweep, startup_trials=startup_trials
    )
    if mode == "bayes":  # the corners of the search bound every proposal
        checked = [
            (t, a)
            for t in {min(temperatures), max(temperatures)}
            for a in {min(alphas), max(alphas)}
        ]
    else:
        checked = sweep_points(mode, temperatures, alphas, **sweep)
    for temperature, alpha in checked:
        checks.validate_config(_trial_config(config, temperature, alpha), jax.device_count())
    checks.check_workdir(workdir)
    if mode != "bayes":
        for index, point in enumerate(checked):
            _claim_trialdir(os.path.join(workdir, f"trial_{index}"), point, overwrite=overwrite)
        return checked
    bounds = dict(temperatures=temperatures, alphas=alphas, sweep_seed=sweep_seed)
    bounds.update(startup_trials=STARTUP_TRIALS if startup_trials is None else startup_trials)
    points, finished = [], []
    for index in range(num_trials):
        points.append(propose_bayes(_history(finished, select_on), **bounds))
        trialdir = os.path.join(workdir, f"trial_{index}")
        _claim_trialdir(trialdir, points[-1], overwrite=overwrite)
        result = jsonfiles.read(os.path.join(trialdir, "result.json"))
        if result is None:
            break
        finished.append(result)
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
    startup_trials: int | None = None,
    select_on: str = "validation",
    overwrite: bool = False,
    shared_workdir: str | None = None,
) -> list[dict[str, Any]]:
    """Trains the distilled student of every trial; writes the sweep's report.

    Args:
      config: the experiment config; its temperature and alpha are replaced by
        each trial's.
      workdir: the output directory.
      mode, temperatures, alphas, num_trials, sweep_seed, startup_trials: see
        :func:`check_sweep`.
      select_on: the split whose mean accuracy picks the best trial (and that bayes
        mode maximizes), ``"validation"`` or ``"test"``.
      overwrite: delete and train again the runs made with another config, and the
        trials of another sweep, instead of refusing.
      shared_workdir: where the teacher and the student from scratch live,
        ``SHARED/seed_<s>/{teacher,scratch}`` (default ``workdir``), so that sweeps
        in several workdirs can share them.

    Raises ``ExperimentError`` for a bad sweep value, config field or workdir before
    any training.

    Returns:
      One record per trial: ``trial``, ``temperature``, ``alpha``, per-run ``runs`` and,
      for every result column, ``{"mean", "std", "values"}`` over the config's seeds.
    """
    if mode == "bayes" and startup_trials is None:
        startup_trials = STARTUP_TRIALS
    sweep = dict(mode=mode, temperatures=temperatures, alphas=alphas)
    sweep.update(num_trials=num_trials, sweep_seed=sweep_seed, startup_trials=startup_trials)
    points = plan_sweep(config, workdir, select_on=select_on, overwrite=overwrite, **sweep)
    propose = _proposer(points, sweep, select_on)
    total = num_trials if mode == "bayes" else len(points)
    shared_workdir = shared_workdir or workdir
    checks.check_workdir(shared_workdir)
    is_chief = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)

    experiment = train.Experiment(config, shared_workdir)
    experiment.check_features()  # before the teacher trains
    seeds = [int(seed) for seed in config.seeds]

    def distilled_runs(index, temperature, alpha):
        trial_config = _trial_config(config, temperature, alpha)
        return {
            os.path.join(workdir, f"trial_{index}", f"seed_{seed}", "distilled"): (
                experiment.run_fields("distilled", seed, trial_config)
            )
            for seed in seeds
        }

    planned = {
        experiment.rundir(kind, seed): experiment.run_fields(kind, seed)
        for seed in seeds
        for kind in ("teacher", "scratch")
    }
    for index, point in enumerate(points):
        planned.update(distilled_runs(index, *point))
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
    for index in tqdm(range(total), desc=f"{mode} sweep", disable=not is_chief):
        temperature, alpha = propose(trials)
        trialdir = os.path.join(workdir, f"trial_{index}")
        if mode == "bayes":  # proposed now: from the results of the trials trained so far
            _claim_trialdir(trialdir, (temperature, alpha), overwrite=overwrite)
            experiment.check_runs(distilled_runs(index, temperature, alpha), overwrite=overwrite)
        record = {"trial": index, "temperature": temperature, "alpha": alpha}
        os.makedirs(trialdir, exist_ok=True)
        if is_chief:
            jsonfiles.write(os.path.join(trialdir, "trial.json"), record)
        # Finished runs are read back, not trained again.
        objective = methods.distillation_objective(
            _trial_config(config, temperature, alpha), experiment.data_sizes["train"]
        )
        distilled = dict(model=student_model, objective=objective, **student_run)
        runs = [
            experiment.run(
                "distilled", seed, teacher=teachers[seed], rundir=rundir, fields=fields, **distilled
            )[0]
            for seed, (rundir, fields) in zip(
                seeds, distilled_runs(index, temperature, alpha).items(), strict=True
            )
        ]
        record = {**record, **report.summarize(runs)["distilled"], "runs": runs}
        if is_chief:
            jsonfiles.write(os.path.join(trialdir, "result.json"), record)
        trials.append(record)

    if is_chief:
        _write_report(config, workdir, trials, references, experiment, select_on, sweep)
    return trials


def _proposer(
    points: Sequence[tuple[float, float]], sweep: dict[str, Any], select_on: str
) -> Callable[[Sequence[dict[str, Any]]], tuple[float, float]]:
    """``propose(trials) -> (temperature, alpha)`` of the trial after ``trials``: the
    planned ``points`` of a grid or random sweep; TPE's proposal in a bayes sweep."""
    if sweep["mode"] != "bayes":
        return lambda trials: points[len(trials)]
    bounds = {key: sweep[key] for key in ("temperatures", "alphas", "sweep_seed")}
    bounds.update(startup_trials=sweep["startup_trials"])
    return lambda trials: propose_bayes(_history(trials, select_on), **bounds)


def _write_report(config, workdir, trials, references, experiment, select_on, sweep) -> None:
    """Writes ``sweep.md``, ``sweep.json`` and ``sweep_heatmap.png``."""
    mode, seeds = sweep["mode"], [int(seed) for seed in config.seeds]
    reference = report.summarize(references)
    best = best_trial(trials, select_on)
    title = (
        f"{config.dataset}: {config.distill.loss} distillation, {mode} sweep of "
        f"{len(trials)} trials, {config.steps} student steps, seeds {seeds}"
    )
    note = (
        f"Best trial: {best['trial']} (T={best['temperature']:.3g}, "
        f"alpha={best['alpha']:.3g}), chosen on the {select_on} split "
        f"(highest mean {select_on} accuracy). "
    )
    if mode == "bayes":
        note += (
            f"Proposed by Optuna's multivariate TPE (seed {sweep['sweep_seed']}, "
            f"{sweep['startup_trials']} random trials first), maximizing it. "
        )
    note += report.data_note(experiment.data_sizes, config.validation_fraction, kl=False)
    with open(os.path.join(workdir, "sweep.md"), "w") as f:
        f.write(f"# {title}\n\n{note}\n\n{sweep_table(trials, reference, select_on)}\n")
    summary = {"title": title, **sweep}
    summary.update(temperatures=[float(t) for t in sweep["temperatures"]])
    summary.update(alphas=[float(a) for a in sweep["alphas"]], select_on=select_on)
    if mode == "bayes":
        import optuna

        summary.update(optuna=optuna.__version__)
    summary.update(best_trial=best["trial"], examples=experiment.data_sizes)
    summary.update(reference=reference, references=references, trials=trials)
    jsonfiles.write(os.path.join(workdir, "sweep.json"), summary)
    plot_sweep(trials, mode, os.path.join(workdir, "sweep_heatmap.png"), select_on)


def best_trial(trials: Sequence[dict[str, Any]], select_on: str = "validation") -> dict[str, Any]:
    """The trial with the highest mean accuracy on the ``select_on`` split (the first
    of equals)."""
    key = SELECTION_KEY[select_on]
    return max(trials, key=lambda trial: trial[key]["mean"])


def sweep_table(
    trials: Sequence[dict[str, Any]], reference: dict[str, Any], select_on: str = "validation"
) -> str:
    """A markdown table: one row per trial, then the scratch student and the teacher.

    The best trial on the ``select_on`` split is marked ``(best on <split>)``.
    """
    keys = (
        "validation_accuracy",
        "accuracy",
        "agreement",
        "mutual_information",
        "normalized_mutual_information",
    )
    lines = [
        "| trial | temperature | alpha | validation accuracy | test accuracy "
        "| agreement w/ teacher | MI(teacher; student) (nats) | normalized MI |",
        "|---|---|---|---|---|---|---|---|",
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

    key = SELECTION_KEY[select_on]
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
    flags.DEFINE_integer(
        "num_trials", None, "Trials of mode=random and bayes; the first grid points of mode=grid."
    )
    flags.DEFINE_integer("sweep_seed", 0, "Seed of the draws of mode=random and of mode=bayes.")
    flags.DEFINE_integer(
        "startup_trials",
        None,
        f"Random trials before TPE in mode=bayes (default {STARTUP_TRIALS}).",
    )
    flags.DEFINE_enum(
        "select_on", "validation", list(SELECT_ON), "The split whose accuracy picks the best trial."
    )
    flags.DEFINE_bool(
        "overwrite", False, "Delete and train again the runs made with another config."
    )
    flags.mark_flags_as_required(["config", "workdir"])


def parse_floats(name: str, values: Sequence[str]) -> list[float]:
    """A list flag's values as floats; ``ExperimentError`` naming the flag otherwise."""
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
    sweep.update(startup_trials=FLAGS.startup_trials)
    sweep.update(select_on=FLAGS.select_on, overwrite=FLAGS.overwrite)

    def sweep_from_flags():
        sweep["temperatures"] = parse_floats("temperatures", FLAGS.temperatures)
        sweep["alphas"] = parse_floats("alphas", FLAGS.alphas)
        run_sweep(config, workdir, **sweep)

    run_command(sweep_from_flags)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "sweep.md")) as f:
            print(f.read())
        print(f"Sweep results, runs and heatmap in {os.path.abspath(workdir)}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
