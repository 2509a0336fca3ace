"""Fused chunked distillation loss against the naive one: temp memory and time.

Both compute ``0.5 * KL(teacher || student) + 0.5 * CE`` and its gradients with
respect to the student's hidden states ``[N, d]`` and output projection
``[d, V]``, from the teacher's hidden states and projection; the naive one builds
both ``[N, V]`` logits whole and differentiates with autodiff
(``chunked_distillation_loss(..., chunk_size=None)``), the chunked one
(``chunk_size="auto"``) holds one chunk's logits at a time and computes the
gradients in its forward pass. At d=512 and V=65,536:

- temp memory, from ``jit(grad).lower(...).compile().memory_analysis()``:
  chunked / naive, target <= 1/8;
- time of one loss + gradient call (compiled ahead of time, interleaved rounds):
  chunked / naive, target <= 1.0 at N=8,192 and <= 1.25 at N=1,024.

On a GPU, also Liger-Kernel's own shape (N=8,192, d=4,096, V=128,256, bfloat16
inputs): the same two rows, and the chunked loss + gradient's peak memory (arguments
+ outputs + temporaries of the compiled program) against the 8.7 GB that Liger's
authors report for their fused linear JSD at that shape on an H100 (target <= 1).
Without a GPU that row says ``skipped: no GPU``.

    python -m benchmarks.chunked_loss [--smoke] [--json PATH]
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp

from benchmarks._report import Config, Result, Target, main, skipped
from benchmarks._timing import interleave, memory_stats, repeat
from jaxkd.losses._chunked import chunked_distillation_loss, resolve_chunk_size

NAME = "chunked_loss"
MEMORY_TARGET = Target("<=", 1 / 8)
TIME_TARGETS = {8192: Target("<=", 1.0), 1024: Target("<=", 1.25)}
HIDDEN, VOCAB = 512, 65536
LIGER_SHAPE = (8192, 4096, 128256)  # N, d, V of Liger-Kernel's fused linear JSD figure
LIGER_PEAK_BYTES = 8.7e9  # its reported peak memory at that shape (H100, bf16)


def problem(tokens: int, hidden: int, vocab: int, dtype=jnp.float32):
    """Student and teacher hidden states and projections, and labels."""
    keys = jax.random.split(jax.random.key(0), 5)
    scale = hidden**-0.5
    return (
        jax.random.normal(keys[0], (tokens, hidden), dtype),
        (scale * jax.random.normal(keys[1], (hidden, vocab))).astype(dtype),
        jax.random.normal(keys[2], (tokens, hidden), dtype),
        (scale * jax.random.normal(keys[3], (hidden, vocab))).astype(dtype),
        jax.random.randint(keys[4], (tokens,), 0, vocab),
    )


def compiled_loss_and_grad(args, chunk_size):
    """``jit(value_and_grad)`` of the loss with respect to hidden states and kernel, compiled."""

    def loss(hidden, kernel, teacher_hidden, teacher_kernel, labels):
        return chunked_distillation_loss(
            hidden,
            kernel,
            labels,
            teacher_hidden=teacher_hidden,
            teacher_kernel=teacher_kernel,
            alpha=0.5,
            chunk_size=chunk_size,
        ).loss

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    return fn.lower(*args).compile()


def measure(tokens: int, hidden: int, vocab: int, config: Config, dtype=jnp.float32):
    """The memory and time rows at one size (and Liger's peak-memory row in bfloat16)."""
    args = problem(tokens, hidden, vocab, dtype)
    chunk = resolve_chunk_size("auto", vocab)
    naive = compiled_loss_and_grad(args, None)
    chunked = compiled_loss_and_grad(args, "auto")
    memory = {"naive": memory_stats(naive), "chunked": memory_stats(chunked)}
    size = f"N={tokens}, d={hidden}, V={vocab}" + ("" if dtype == jnp.float32 else ", bf16")
    rows = [
        Result(
            benchmark=NAME,
            figure=f"{size}: temp memory, chunked / naive",
            ratio=memory["chunked"]["temp_size_in_bytes"] / memory["naive"]["temp_size_in_bytes"],
            target=MEMORY_TARGET,
            times={
                "chunked": memory["chunked"]["temp_size_in_bytes"],
                "naive": memory["naive"]["temp_size_in_bytes"],
                "one [N, V] f32": tokens * vocab * 4,
            },
            units=dict.fromkeys(("chunked", "naive", "one [N, V] f32"), "B"),
            note=f"{size}: chunk of {chunk} tokens (chunk_size='auto')",
        )
    ]
    measured = interleave(
        {"naive": repeat(naive, *args), "chunked": repeat(chunked, *args)},
        rounds=config.reps(3),
        min_round_seconds=config.round_seconds(0.5),
        warmup=1,
    )
    rows.append(
        Result(
            benchmark=NAME,
            figure=f"{size}: loss+grad time, chunked / naive",
            ratio=measured.ratio("chunked", "naive"),
            target=TIME_TARGETS.get(tokens),
            times=measured.medians(),
        )
    )
    if dtype != jnp.float32:
        peak = memory["chunked"]["peak_bytes"]
        rows.append(
            Result(
                benchmark=NAME,
                figure=f"{size}: chunked peak memory / Liger's 8.7 GB",
                ratio=peak / LIGER_PEAK_BYTES,
                target=Target("<=", 1.0),
                times={"chunked peak": peak, "naive peak": memory["naive"]["peak_bytes"]},
                units={"chunked peak": "B", "naive peak": "B"},
                note=f"device: {jax.devices()[0].device_kind}",
            )
        )
    return rows


def run(config: Config) -> list[Result]:
    """Two sizes, N=8,192 and N=1,024 (tiny ones in a smoke run); Liger's shape on a GPU."""
    if config.smoke:
        rows = measure(256, 16, VOCAB, config)
    else:
        rows = [row for tokens in (8192, 1024) for row in measure(tokens, HIDDEN, VOCAB, config)]
    if jax.devices()[0].platform != "gpu":
        figure = "N=8192, d=4096, V=128256, bf16: chunked peak memory / Liger's 8.7 GB"
        return [*rows, skipped(NAME, figure, "skipped: no GPU")]
    return [*rows, *measure(*LIGER_SHAPE, config, dtype=jnp.bfloat16)]


if __name__ == "__main__":
    sys.exit(main(NAME, run, __doc__.splitlines()[0]))
