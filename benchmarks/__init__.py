"""Ratio benchmarks of jaxkd.

Every figure is a ratio of two things measured side by side in one process run
(interleaved repetitions, medians), so that it says something about jaxkd rather
than about the machine. Run them all and print one table::

    python -m benchmarks.run_all [--smoke] [--json PATH]

or one at a time, e.g. ``python -m benchmarks.step_overhead``.

Modules:
  step_overhead: the jaxkd step against a hand-written JAX KD step.
  flops_utilization: achieved FLOP/s of the jaxkd step against a matmul peak.
  torch_comparison: the jaxkd step against the same KD step in PyTorch (CPU).
  cached_teacher: cached teacher logits against an online teacher, beside the ideal.
  memory_and_flops: compiled memory with and without donation; FLOPs of the step.
  data_parallel: ``pmap_step`` and ``shard_step`` on 8 simulated devices against 1.
  gpu: steps/s and FLOP/s in float32 and bfloat16 on a GPU (skipped without one).
"""
