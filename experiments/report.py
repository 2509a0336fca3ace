"""The results table (markdown and JSON) and training-curve plots of a workdir.

Every column but the validation accuracy is measured on the test split. The KL
column is the plain ``KL(teacher || student)`` of the T=1 distributions (no T^2
factor), whatever temperature the student was distilled at. The MI columns are the
mutual information, in nats, of the teacher's and the student's top-1 predictions
over the test examples, and its normalization ``MI / sqrt(H(teacher) H(student))``
(:func:`jaxkd.mutual_information`); like the agreement, n/a for the teacher.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from experiments import jsonfiles

# (column title, result key, format). Mean +- std over seeds where it varies.
COLUMNS = (
    ("validation accuracy", "validation_accuracy", "{:.4f}"),
    ("test accuracy", "accuracy", "{:.4f}"),
    ("agreement w/ teacher", "agreement", "{:.4f}"),
    ("MI(teacher; student) (nats)", "mutual_information", "{:.4f}"),
    ("normalized MI", "normalized_mutual_information", "{:.4f}"),
    ("KL(teacher ‖ student) at T=1", "kl", "{:.4f}"),
    ("student entropy", "student_entropy", "{:.3f}"),
    ("teacher entropy", "teacher_entropy", "{:.3f}"),
    ("params", "params", "{:,.0f}"),
    ("FLOPs/example", "flops_per_example", "{:,.0f}"),
    ("compile time (s)", "compile_time_s", "{:.1f}"),
    ("train time (s)", "train_time_s", "{:.1f}"),
    ("inference (ex/s)", "throughput", "{:,.0f}"),
)
RUN_TITLES = {
    "teacher": "teacher",
    "scratch": "student from scratch",
    "distilled": "distilled student",
    "distilled_cached": "distilled student, cached teacher",
    "distilled_dynamic": "distilled student, dynamic",
}


def summarize(
    results: Sequence[dict[str, Any]],
    *,
    columns: Sequence[tuple[str, str, str]] = COLUMNS,
    run_titles: Mapping[str, str] = RUN_TITLES,
) -> dict[str, dict[str, Any]]:
    """Per run kind: mean, std and values over seeds of every numeric column."""
    summary = {}
    for kind in run_titles:
        rows = [r for r in results if r["run"] == kind]
        if not rows:
            continue
        entry = {"model": rows[0]["model"], "seeds": [r["seed"] for r in rows]}
        for _, key, _ in columns:
            # None: not measured (written as null in strict JSON).
            values = np.asarray([_number(r.get(key)) for r in rows], np.float64)
            entry[key] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values)),
                "values": values.tolist(),
            }
        summary[kind] = entry
    return summary


def _number(value) -> float:
    return np.nan if value is None else float(value)


def format_mean_std(stats: dict[str, Any], fmt: str = "{:.4f}") -> str:
    """``mean ± std`` of a summarized column; the mean alone for one seed or no spread."""
    if np.isnan(stats["mean"]):
        return "n/a"
    if len(stats["values"]) > 1 and stats["std"] > 0:
        return f"{fmt.format(stats['mean'])} ± {fmt.format(stats['std'])}"
    return fmt.format(stats["mean"])


def markdown_table(
    summary: dict[str, dict[str, Any]],
    *,
    columns: Sequence[tuple[str, str, str]] = COLUMNS,
    run_titles: Mapping[str, str] = RUN_TITLES,
) -> str:
    """A markdown table: one row per run kind, mean ± std over seeds."""
    header = ["run", "model", *(title for title, _, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for kind, entry in summary.items():
        cells = [run_titles[kind], entry["model"]]
        cells += [format_mean_std(entry[key], fmt) for _, key, fmt in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


COLORS = ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")


def plot_curves(
    rundirs: Mapping[str, Sequence[str]],
    path: str,
    *,
    metric: str = "accuracy",
    run_titles: Mapping[str, str] = RUN_TITLES,
    log_metric: bool = False,
) -> None:
    """Train loss and validation (or, without one, test) ``metric`` against steps.

    Args:
      rundirs: per run kind, the directories (one per seed) holding metrics.jsonl.
      path: where to write the PNG.
      metric: the eval record's key to plot beside the training loss.
      run_titles: legend titles by run kind.
      log_metric: a log scale for ``metric`` (e.g. perplexity).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for (kind, dirs), color in zip(rundirs.items(), itertools.cycle(COLORS)):
        for index, rundir in enumerate(dirs):
            records = jsonfiles.read_lines(os.path.join(rundir, "metrics.jsonl"))
            train = [r for r in records if r["split"] == "train"]
            splits = {r["split"] for r in records}
            shown = "validation" if "validation" in splits else "test"
            evaluated = [r for r in records if r["split"] == shown]
            label = run_titles[kind] if index == 0 else None
            for ax, rows, key, marker in (
                (loss_ax, train, "loss", None),
                (metric_ax, evaluated, metric, "o"),
            ):
                if rows:
                    ax.plot(
                        [r["step"] for r in rows],
                        [r[key] for r in rows],
                        color=color,
                        alpha=0.8,
                        marker=marker,
                        label=label,
                    )
    loss_ax.set(
        xlabel="step",
        ylabel="training objective",
        yscale="log",
        title="training loss (per run's own objective)",
    )
    metric_ax.set(
        xlabel="step",
        ylabel=metric,
        yscale="log" if log_metric else "linear",
        title=f"{metric} (validation split if any)",
    )
    for ax in (loss_ax, metric_ax):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def data_note(data_sizes: Mapping[str, int], validation_fraction: float, *, kl: bool = True) -> str:
    """One sentence on the splits (their sizes, where the validation split comes from)
    and, with ``kl``, on the KL column."""
    sizes = " / ".join(f"{size:,} {split}" for split, size in data_sizes.items())
    held_out = (
        f"the validation split is a seeded {validation_fraction:.0%} of the training split; "
        if "validation" in data_sizes
        else ""
    )
    note = (
        f"Examples: {sizes}; {held_out}every column but the validation accuracy is "
        "measured on the test split"
    )
    return note + ("; KL(teacher ‖ student) is that of the T=1 distributions." if kl else ".")


def _method_note(config) -> str:
    """The distillation's feature term and dynamic method, when the config has them."""
    parts = []
    feature = config.distill.get("feature")
    if feature is not None and feature.loss:
        parts.append(
            f" + {feature.weight} x {feature.loss} ({feature.student} -> {feature.teacher}, "
            f"projector {feature.projector})"
        )
    dynamic = config.distill.get("dynamic")
    if dynamic is not None and dynamic.method and "distilled_dynamic" in config.student_runs:
        kwargs = dynamic.kwargs.to_dict()
        options = f" {kwargs}" if kwargs else ""
        parts.append(f"; dynamic student: {dynamic.method}{options}")
    return "".join(parts)


def published_table(summary: dict[str, dict[str, Any]], config) -> str:
    """Published accuracies beside ours, when ``config.anchor`` names a published pair.

    Rows: the teacher, the student from scratch and the distilled student (under the
    config's method), each where the paper has a number
    (:mod:`experiments.configs.anchors`); columns: our test accuracy (mean ± std over
    seeds, in %) and the published one with its source.

    Returns:
      A markdown paragraph and table, or ``""`` (no ``config.anchor``, an unknown
      pair, or nothing published for these runs).
    """
    from experiments.configs import anchors

    anchor = config.get("anchor")
    pair = anchor.get("pair") if anchor is not None else None
    if not pair or pair not in anchors.PUBLISHED:
        return ""
    method = anchor.get("method")
    lines = []
    for kind, key in (("teacher", "teacher"), ("scratch", "student"), ("distilled", method)):
        published = anchors.published(pair, key)
        if published is None or kind not in summary:
            continue
        entry = summary[kind]
        stats = entry["accuracy"]
        ours = format_mean_std(
            {
                "mean": 100 * stats["mean"],
                "std": 100 * stats["std"],
                "values": stats["values"],
            },
            "{:.2f}",
        )
        title = RUN_TITLES[kind] + (f" ({method})" if kind == "distilled" else "")
        lines.append(
            f"| {title} | {entry['model']} | {ours} | {published.accuracy:.2f} | "
            f"{published.source} |"
        )
    if not lines:
        return ""
    header = [
        f"Published top-1 test accuracy (%) of {pair} on CIFAR-100 beside ours (the papers: "
        "best epoch on the test set; ours: final):",
        "",
        "| run | model | ours | published (paper) | source |",
        "|---|---|---|---|---|",
    ]
    return "\n".join(header + lines)


def write_report(
    results: Sequence[dict[str, Any]],
    config,
    workdir: str,
    data_sizes: Mapping[str, int] | None = None,
) -> str:
    """Writes results.md, results.json (strict JSON) and training_curves.png.

    Returns:
      The title, the note on the data (with ``data_sizes``) and the table; for a
      published pair (``config.anchor``), then the :func:`published_table`.
    """
    summary = summarize(results)
    table = markdown_table(summary)
    seeds = sorted({r["seed"] for r in results})
    title = (
        f"{config.dataset}: {config.distill.loss} distillation, "
        f"T={config.distill.temperature}, alpha={config.distill.alpha}"
        f"{_method_note(config)}, {config.steps} student steps, seeds {seeds}"
    )
    note = data_note(data_sizes, config.validation_fraction) if data_sizes else ""
    text = "\n\n".join(part for part in (title, note, table) if part)
    with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(f"# {text}\n")
    record = {"title": title, "examples": dict(data_sizes or {}), "summary": summary}
    jsonfiles.write(os.path.join(workdir, "results.json"), {**record, "runs": list(results)})
    rundirs = {
        kind: [os.path.join(workdir, f"seed_{seed}", kind) for seed in seeds] for kind in RUN_TITLES
    }
    plot_curves(rundirs, os.path.join(workdir, "training_curves.png"))
    published = published_table(summary, config)
    if published:
        with open(os.path.join(workdir, "results.md"), "a") as f:
            f.write(f"\n{published}\n")
        text = f"{text}\n\n{published}"
    return text
