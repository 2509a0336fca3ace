"""What a cached sparse teacher costs on disk and loses against the full KL.

For the LM experiment's teacher/student pair (the ``quick`` config by default: the
teacher and the seed-0 ``kd`` student of ``--workdir``, trained there first when
missing), the teacher's outputs on the first ``--windows`` training windows are
cached for k in {8, 32, 128} and as full logits (:mod:`experiments.cache_teacher`,
float16 by default), and the table gives, per k:

- bytes/token: of the record layout (top-k log-probs, uint16 ids, a float32 log
  tail) and measured on disk (zstd-compressed ArrayRecord shards);
- the mean per-token ``T^2 KL(teacher || student)`` with the full teacher, and the
  tail-bucket KL and renormalized top-k KL with the cached teacher as read back,
  each with its gap to the full KL (tail-bucket KL is a lower bound: the KL
  between the two distributions coarsened to k + 1 bins).

    python -m benchmarks.teacher_cache_table --workdir=/tmp/jaxkd-runs/lm-quick \\
        [--config=experiments/configs/lm_stdlib.py:quick] [--windows=1024] [--dtype=float16] \\
        [--data_dir=DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

import jaxkd
from experiments import cache_teacher
from experiments.data import loader
from experiments.data.teacher_cache import LOGITS_KEY, TOP_K_KEYS, CacheSpec
from jaxkd.losses._sparse_teacher import SparseTeacher, tail_bucket_kl, top_k_kl

KS = (8, 32, 128, None)
EVAL_WINDOWS = 32  # windows whose logits are held at once
COLUMNS = (
    "k",
    "bytes/token (layout)",
    "bytes/token (disk)",
    "full KL",
    "tail-bucket KL",
    "gap",
    "top-k KL",
    "gap",
)


def load_config(path: str):
    """``get_config(arg)`` of a ``path[:arg]`` config file, as ``--config`` takes it."""
    path, _, arg = path.partition(":")
    spec = importlib.util.spec_from_file_location("lm_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _kl_sums(student_logits, teacher_logits, batch, *, temperature: float) -> dict[str, float]:
    """Per-token full, tail-bucket and top-k KL of one cached batch, summed."""
    full = jaxkd.kl_divergence(student_logits, teacher_logits, temperature=temperature)
    sums = {"full KL": float(jnp.sum(full))}
    if TOP_K_KEYS[0] in batch:
        teacher = SparseTeacher(*(jnp.asarray(batch[key]) for key in TOP_K_KEYS))
        for name, loss in (("tail-bucket KL", tail_bucket_kl), ("top-k KL", top_k_kl)):
            sums[name] = float(jnp.sum(loss(student_logits, teacher, temperature=temperature)))
    else:  # the stored full logits, in the cache's dtype
        stored = jaxkd.kl_divergence(
            student_logits, jnp.asarray(batch[LOGITS_KEY]), temperature=temperature
        )
        sums["tail-bucket KL"] = float(jnp.sum(stored))
    return sums


def _kl_means(student, teacher, cache, inputs, *, temperature: float, batch_size: int):
    """Mean per-token KLs over ``inputs`` ``[W, L]``, ``batch_size`` windows at a time.

    The ``[W, L, V]`` logits of the whole set would not fit in memory at a
    realistic vocabulary; each batch's are made, used and dropped.
    """
    totals: dict[str, float] = {}
    for start in range(0, len(inputs), batch_size):
        rows = np.arange(start, min(start + batch_size, len(inputs)))
        sums = _kl_sums(
            student(inputs[rows]), teacher(inputs[rows]), cache.read(rows), temperature=temperature
        )
        for name, value in sums.items():
            totals[name] = totals.get(name, 0.0) + value
    return {name: value / inputs.size for name, value in totals.items()}


def measure(config, workdir: str, *, windows: int, dtype: str, ks=KS) -> list[dict]:
    """One row per k: bytes per token and the KLs (see the module docstring)."""
    experiment, teacher_variables = cache_teacher.load_teacher(config, workdir)
    teacher_apply = jaxkd.linen_teacher_apply(experiment.models["teacher"], train_kwarg=None)
    _, student_state = experiment.run("kd", 0, (teacher_apply, teacher_variables))
    student = experiment.models["student"]
    count = min(windows, len(experiment.data.train))
    subset = [experiment.data.train[i] for i in range(count)]
    inputs = loader.read(subset, np.arange(count), keys=("tokens",))["tokens"][:, :-1]
    student_apply = jax.jit(student.apply)
    teacher_forward = jax.jit(teacher_apply)

    def student_logits(tokens):
        return student_apply({"params": student_state.params}, tokens)

    def teacher_logits(tokens):
        return teacher_forward(teacher_variables, tokens)

    temperature = float(config.kd.temperature)
    base = cache_teacher.lm_cache_spec(
        experiment.data.train,
        experiment.data.tokenizer,
        teacher_variables,
        k=None,
        dtype=dtype,
        temperature=None,
    )
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        for k in ks:
            spec = CacheSpec(
                **{
                    **base.identity(),
                    "dataset_fingerprint": f"the first {count} of {base.dataset_fingerprint}",
                    "num_records": count,
                    "k": k,
                    "temperature": None if k is None else temperature,
                }
            )
            cache = cache_teacher.write_cache(
                os.path.join(directory, f"k{k}"),
                spec,
                subset,
                teacher_apply,
                teacher_variables,
                batch_size=config.cache.batch_size,
                mesh=experiment.mesh,
                progress=False,
            )
            means = _kl_means(
                student_logits,
                teacher_logits,
                cache,
                inputs,
                temperature=temperature,
                batch_size=EVAL_WINDOWS,
            )
            rows.append(
                {
                    "k": "full" if k is None else k,
                    "layout_bytes_per_token": spec.record_bytes / spec.seq_len,
                    "bytes_per_token": cache.bytes_per_token,
                    **means,
                }
            )
    return rows


def _gap(value: float | None, full: float) -> str:
    return "" if value is None else f"{100 * (value - full) / full:+.1f}%"


def table(rows: list[dict], *, dtype: str) -> str:
    """A markdown table of :func:`measure`'s rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        full = row["full KL"]
        tail, top = row.get("tail-bucket KL"), row.get("top-k KL")
        cells = [
            f"{row['k']}" + (f" ({dtype} logits)" if row["k"] == "full" else ""),
            f"{row['layout_bytes_per_token']:,.1f}",
            f"{row['bytes_per_token']:,.1f}",
            f"{full:.4f}",
            "" if tail is None else f"{tail:.4f}",
            _gap(tail, full),
            "" if top is None else f"{top:.4f}",
            _gap(top, full),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="the LM experiment's workdir")
    parser.add_argument("--config", default="experiments/configs/lm_stdlib.py:quick")
    parser.add_argument("--windows", type=int, default=1024, help="training windows cached")
    parser.add_argument("--dtype", default="float16", help="float16 | bfloat16 | float32")
    parser.add_argument("--data_dir", default=None, help="TFDS data_dir (default: the config's)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.data_dir is not None:
        config.data_dir = args.data_dir
    rows = measure(config, args.workdir, windows=args.windows, dtype=args.dtype)
    print(
        f"Teacher cache of the first {args.windows} training windows ({args.config}, "
        f"T={config.kd.temperature}, {args.dtype}); mean per-token KL to the seed-0 kd "
        "student. Full-logits row: the KL with the stored logits in the tail-bucket column."
    )
    print(table(rows, dtype=args.dtype))


if __name__ == "__main__":
    main()
