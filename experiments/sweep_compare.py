"""Grid, random and bayes sweeps of the same budget, side by side: ``run_comparison``.

    .venv/bin/python -m experiments.sweep_compare \\
        --config=experiments/configs/mnist1d.py:quick --workdir=/tmp/sweep-compare \\
        --num_trials=8 --temperatures=1,16 --alphas=0.1,0.9

Each method trains ``--num_trials`` distilled students, one per ``(temperature, alpha)``,
over the same ranges (the smallest to the largest listed value) with the runner of
:mod:`experiments.sweep`: grid takes the first ``--num_trials`` points of a grid of
log-spaced temperatures by evenly spaced alphas spanning the ranges (see
:func:`grid_axes`), random draws them (``--sweep_seed``), bayes proposes them with TPE
(``--sweep_seed``, ``--startup_trials``). The teacher and the student from scratch are
trained once per seed and shared by the three. Every method picks its best trial on
the ``--select_on`` split; the table gives that trial's values, its test accuracy, and
the best accuracy found after each trial, which ``sweep_compare.png`` plots.

A rerun with the same workdir reuses the finished trials, as each sweep does.

Workdir layout::

    WORKDIR/seed_<s>/teacher/, WORKDIR/seed_<s>/scratch/  shared by every trial
    WORKDIR/<method>/                  that method's sweep (see experiments.sweep)
    WORKDIR/sweep_compare.md, sweep_compare.json, sweep_compare.png
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from experiments import jsonfiles, report, sweep
from experiments.errors import ExperimentError, run_command

METHODS = ("grid", "random", "bayes")


def grid_axes(
    temperatures: Sequence[float], alphas: Sequence[float], num_trials: int
) -> tuple[list[float], list[float]]:
    """The axes of a grid of at least ``num_trials`` points spanning the ranges.

    ``ceil(sqrt(N))`` temperatures, log-spaced from ``min(temperatures)`` to
    ``max(temperatures)``, by ``ceil(N / that)`` alphas, evenly spaced from
    ``min(alphas)`` to ``max(alphas)``; an axis of one point takes its range's
    (geometric, for the temperature) midpoint, and a range of one value gets one point
    and leaves the other axis all ``N``. Grid order runs over the alphas first, so the
    first ``N`` points leave out the corner of the largest temperature and alpha first.
    """
    if num_trials < 1:
        raise ExperimentError(f"Bad sweep: num_trials={num_trials} must be >= 1.")
    (t_low, t_high), (a_low, a_high) = (
        (float(min(values)), float(max(values))) for values in (temperatures, alphas)
    )
    if t_low == t_high or a_low == a_high:
        sizes = (1 if t_low == t_high else num_trials), (1 if a_low == a_high else num_trials)
    else:
        rows = math.ceil(math.sqrt(num_trials))
        sizes = rows, math.ceil(num_trials / rows)
    if sizes[0] == 1:
        temperature_axis = [math.sqrt(t_low * t_high)]
    else:
        temperature_axis = np.geomspace(t_low, t_high, sizes[0]).tolist()
    alpha_axis = [(a_low + a_high) / 2] if sizes[1] == 1 else np.linspace(a_low, a_high, sizes[1])
    return [float(t) for t in temperature_axis], [float(a) for a in alpha_axis]


def method_sweeps(
    *,
    num_trials: int,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    sweep_seed: int = 0,
    startup_trials: int | None = None,
) -> dict[str, dict[str, Any]]:
    """The :func:`experiments.sweep.run_sweep` arguments of each method, by name."""
    temperatures, alphas = [float(t) for t in temperatures], [float(a) for a in alphas]
    grid_temperatures, grid_alphas = grid_axes(temperatures, alphas, num_trials)
    ranges = dict(temperatures=temperatures, alphas=alphas, num_trials=num_trials)
    return {
        "grid": dict(
            mode="grid", temperatures=grid_temperatures, alphas=grid_alphas, num_trials=num_trials
        ),
        "random": dict(mode="random", **ranges, sweep_seed=sweep_seed),
        "bayes": dict(mode="bayes", **ranges, sweep_seed=sweep_seed, startup_trials=startup_trials),
    }


def run_comparison(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    num_trials: int,
    temperatures: Sequence[float],
    alphas: Sequence[float],
    sweep_seed: int = 0,
    startup_trials: int | None = None,
    select_on: str = "validation",
    overwrite: bool = False,
) -> dict[str, list[dict[str, Any]]]:
    """Runs the grid, random and bayes sweeps of ``num_trials`` trials each; writes the
    comparison.

    Args:
      config: the experiment config.
      workdir: the output directory; each method's sweep lives in ``WORKDIR/<method>``.
      num_trials: trials per method (>= 1).
      temperatures, alphas: their smallest and largest values bound every method's
        search.
      sweep_seed, startup_trials: see :func:`experiments.sweep.check_sweep`.
      select_on: the split whose mean accuracy picks each method's best trial (and that
        bayes maximizes).
      overwrite: see :func:`experiments.sweep.run_sweep`.

    Raises ``ExperimentError`` for a bad value of any method before any training.

    Returns:
      Each method's trial records (see :func:`experiments.sweep.run_sweep`), by name.
    """
    sweeps = method_sweeps(
        num_trials=num_trials,
        temperatures=temperatures,
        alphas=alphas,
        sweep_seed=sweep_seed,
        startup_trials=startup_trials,
    )
    options = dict(select_on=select_on, overwrite=overwrite)
    for method, kwargs in sweeps.items():  # every method's values, before training any
        sweep.plan_sweep(config, os.path.join(workdir, method), **kwargs, **options)
    results = {
        method: sweep.run_sweep(
            config, os.path.join(workdir, method), **kwargs, **options, shared_workdir=workdir
        )
        for method, kwargs in sweeps.items()
    }
    if jax.process_index() == 0:
        references = [
            jsonfiles.read(os.path.join(workdir, f"seed_{int(seed)}", kind, "result.json"))
            for seed in config.seeds
            for kind in ("teacher", "scratch")
        ]
        _write_comparison(config, workdir, results, report.summarize(references), sweeps, options)
    return results


def best_so_far(trials: Sequence[dict[str, Any]], select_on: str = "validation") -> list[float]:
    """The best mean ``select_on`` accuracy among trials ``0 .. k``, for every ``k``
    (NaN until a trial measured one)."""
    key = sweep.SELECTION_KEY[select_on]
    values = np.asarray([trial[key]["mean"] for trial in trials], np.float64)
    best, curve = np.nan, []
    for value in values:
        best = np.fmax(best, value)
        curve.append(float(best))
    return curve


def comparison_table(
    results: Mapping[str, Sequence[dict[str, Any]]], select_on: str = "validation"
) -> str:
    """A markdown table: one row per method with its best trial on the ``select_on``
    split and the best accuracy after each trial."""
    lines = [
        f"| method | trials | best {select_on} accuracy | its T, alpha "
        f"| test accuracy of that trial | best {select_on} accuracy after each trial |",
        "|---|---|---|---|---|---|",
    ]
    for method, trials in results.items():
        best = sweep.best_trial(trials, select_on)
        cells = [method, str(len(trials))]
        cells.append(report.format_mean_std(best[sweep.SELECTION_KEY[select_on]]))
        cells.append(f"T={best['temperature']:.3g}, alpha={best['alpha']:.3g}")
        cells.append(report.format_mean_std(best["accuracy"]))
        cells.append(", ".join(f"{value:.4f}" for value in best_so_far(trials, select_on)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_comparison(
    results: Mapping[str, Sequence[dict[str, Any]]], path: str, select_on: str = "validation"
) -> None:
    """The best mean ``select_on`` accuracy after each trial, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, trials in results.items():
        curve = best_so_far(trials, select_on)
        ax.plot(range(1, len(curve) + 1), curve, marker="o", drawstyle="steps-post", label=method)
    ax.set(xlabel="trials", ylabel=f"best {select_on} accuracy so far")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("distilled student: best trial so far, by search method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _write_comparison(config, workdir, results, reference, sweeps, options) -> None:
    """Writes ``sweep_compare.md``, ``sweep_compare.json`` and ``sweep_compare.png``."""
    select_on, seeds = options["select_on"], [int(seed) for seed in config.seeds]
    bayes, grid = sweeps["bayes"], sweeps["grid"]
    startup = sweep.STARTUP_TRIALS if bayes["startup_trials"] is None else bayes["startup_trials"]
    title = (
        f"{config.dataset}: {config.distill.loss} distillation, grid vs random vs bayes "
        f"sweeps of {bayes['num_trials']} trials each, {config.steps} student steps, "
        f"seeds {seeds}"
    )
    scratch, teacher = (reference[kind]["accuracy"] for kind in ("scratch", "teacher"))
    note = (
        f"Temperature in [{min(bayes['temperatures']):.3g}, {max(bayes['temperatures']):.3g}] "
        f"(log scale), alpha in [{min(bayes['alphas']):.3g}, {max(bayes['alphas']):.3g}]. "
        f"Grid: the first {grid['num_trials']} points of T in "
        f"{{{', '.join(f'{t:.3g}' for t in grid['temperatures'])}}} x alpha in "
        f"{{{', '.join(f'{a:.3g}' for a in grid['alphas'])}}}; random: seed "
        f"{bayes['sweep_seed']}; bayes: Optuna's multivariate TPE, seed "
        f"{bayes['sweep_seed']}, {startup} random trials first. Each method's best trial "
        f"has the highest mean {select_on} accuracy. Test accuracy of the student from "
        f"scratch: {report.format_mean_std(scratch)}; of the teacher: "
        f"{report.format_mean_std(teacher)}."
    )
    table = comparison_table(results, select_on)
    with open(os.path.join(workdir, "sweep_compare.md"), "w") as f:
        f.write(f"# {title}\n\n{note}\n\n{table}\n")
    summary = {"title": title, "select_on": select_on, "sweeps": sweeps, "reference": reference}
    summary["methods"] = {
        method: {
            "best_trial": sweep.best_trial(trials, select_on)["trial"],
            "best_so_far": best_so_far(trials, select_on),
            "trials": [{k: v for k, v in t.items() if k != "runs"} for t in trials],
        }
        for method, trials in results.items()
    }
    jsonfiles.write(os.path.join(workdir, "sweep_compare.json"), summary)
    plot_comparison(results, os.path.join(workdir, "sweep_compare.png"), select_on)


# Command line -----------------------------------------------------------------


def _define_flags() -> None:
    """Only when run as a program, so that importing the module registers no flags."""
    config_flags.DEFINE_config_file("config", None, "Path to an experiment config.")
    flags.DEFINE_string("workdir", None, "Directory for checkpoints and results.")
    flags.DEFINE_integer("num_trials", None, "Trials per method.")
    flags.DEFINE_list("temperatures", "1,8", "Temperatures (> 0): their range is searched.")
    flags.DEFINE_list("alphas", "0.5,0.9", "Alphas in [0, 1]: their range is searched.")
    flags.DEFINE_integer("sweep_seed", 0, "Seed of the random draws and of TPE.")
    flags.DEFINE_integer(
        "startup_trials", None, f"Random trials before TPE (default {sweep.STARTUP_TRIALS})."
    )
    flags.DEFINE_enum(
        "select_on", "validation", list(sweep.SELECT_ON), "The split that picks the best trial."
    )
    flags.DEFINE_bool(
        "overwrite", False, "Delete and train again the runs made with another config."
    )
    flags.mark_flags_as_required(["config", "workdir", "num_trials"])


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # keep checkpoint chatter off the console
    FLAGS = flags.FLAGS
    config, workdir = FLAGS.config, FLAGS.workdir

    def compare_from_flags():
        run_comparison(
            config,
            workdir,
            num_trials=FLAGS.num_trials,
            temperatures=sweep.parse_floats("temperatures", FLAGS.temperatures),
            alphas=sweep.parse_floats("alphas", FLAGS.alphas),
            sweep_seed=FLAGS.sweep_seed,
            startup_trials=FLAGS.startup_trials,
            select_on=FLAGS.select_on,
            overwrite=FLAGS.overwrite,
        )

    run_command(compare_from_flags)
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "sweep_compare.md")) as f:
            print(f.read())
        print(f"Comparison, sweeps and runs in {os.path.abspath(workdir)}")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
