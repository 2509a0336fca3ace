"""A causal-LM teacher distilled into a student 3.6x smaller, on Python's own source.

The corpus is the running interpreter's standard library (``python_stdlib_source``:
split by file into train / validation / test), tokenized by a byte-level BPE of
8,192 tokens trained locally on the train split. The runs share data, steps and
optimizer: the teacher; and, for each seed, a student from scratch (next-token
cross-entropy), a student with token-level KD (``kd``: a divergence to the
teacher's next-token distribution mixed with the cross-entropy) and a student
with on-policy GKD (``gkd``: with probability ``lmbda`` a batch's continuations
are sampled from the current student and scored by the teacher).

    .venv/bin/python -m experiments.distill_lm --config=experiments/configs/lm_stdlib.py \\
        --workdir=/tmp/jaxkd-runs/lm

``cached`` adds ``kd_cached``: ``kd`` from the teacher's cached top-k outputs (no
teacher forward in the step; see ``cache``), after caching the teacher once over
every training window (minutes; :mod:`experiments.cache_teacher` does it alone).
Rerun on the same workdir, it reuses the other runs::

    .venv/bin/python -m experiments.distill_lm \\
        --config=experiments/configs/lm_stdlib.py:cached --workdir=/tmp/jaxkd-runs/lm

``quick`` shrinks everything (a 0.8 MB corpus subset, a 512-token vocabulary,
tiny models, a few steps, no ``kd_cached``) for a smoke test in well under a minute.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import finish


def _model(d_model: int, num_layers: int, num_heads: int) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        {
            "d_model": d_model,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "d_ff": 4 * d_model,
            "tie_embeddings": True,
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    # Data: corpus, tokenizer, windows.
    config.corpus = "full"  # full | small (python_stdlib_source builder configs)
    config.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: TFDS default
    config.tokenizer = "bpe"  # bpe | bytes
    config.vocab_size = 8192  # for bpe; the byte tokenizer has 258
    config.seq_len = 64  # tokens a window feeds the model (plus one target)
    config.prompt_length = 16  # GKD prompts and evaluation samples: the first tokens
    config.eval_windows = 128  # the first windows of validation and test (8,192 tokens)

    # Models: the teacher has about 4x the student's parameters.
    config.teacher = _model(256, 4, 4)
    config.teacher.steps = 360
    config.teacher.learning_rate = 3e-3
    config.teacher.seed = 0
    config.student = _model(128, 2, 2)

    # Optimization, the same for every student.
    config.steps = 150
    config.batch_size = 16  # windows per global batch
    config.optimizer = "adamw"  # adam | adamw | sgd
    config.schedule = "cosine"  # cosine | constant, after linear warmup
    config.momentum = 0.9  # sgd only
    config.learning_rate = 3e-3
    config.warmup_steps = 20
    config.weight_decay = 0.01

    # Token-level KD: alpha * divergence + (1 - alpha) * cross-entropy.
    config.kd = ml_collections.ConfigDict()
    config.kd.loss = "kl"  # kl | reverse_kl | jsd | skew_kl | total_variation
    config.kd.alpha = 0.5
    config.kd.temperature = 1.0
    config.kd.loss_kwargs = ml_collections.ConfigDict()

    # On-policy GKD (Agarwal et al., 2024).
    config.gkd = ml_collections.ConfigDict()
    # GKD trains on the divergence alone (no cross-entropy on the student's own
    # samples); "kl" is GKD's generalized JSD at beta=0 (forward KL).
    config.gkd.loss = "kl"
    config.gkd.alpha = 1.0
    config.gkd.temperature = 1.0
    config.gkd.loss_kwargs = ml_collections.ConfigDict()
    config.gkd.lmbda = 0.5  # probability that a batch is sampled from the student
    config.gkd.sampling_temperature = 1.0

    # Cached teacher (experiments/cache_teacher.py, the kd_cached run): the teacher's
    # top-k log-probs at kd.temperature and its log tail mass on every training window,
    # under WORKDIR/teacher_cache/k<k>/. kd_cached trains on them with the tail-bucket KL
    # and kd's alpha and temperature, so it reads beside kd (the online teacher).
    config.cache = ml_collections.ConfigDict()
    config.cache.k = 32  # 0: the full logits
    config.cache.dtype = "float16"  # of the log-probs: float16 | bfloat16 | float32
    config.cache.batch_size = 64  # windows per teacher forward while caching
    config.cache.loss = "tail_kl"  # tail_kl | top_k_kl (kd_cached with k > 0)

    # Evaluation samples: the teacher's NLL of each model's continuations.
    config.sample_prompts = 32
    config.sampling_temperature = 1.0

    # The students of each seed, all from one initialization (":cached" adds kd_cached).
    config.student_runs = ("scratch", "kd", "gkd")
    config.seeds = (0, 1)
    config.eval_batch_size = 32
    config.eval_every = 75
    config.log_every = 15
    config.checkpoint_every = 75

    quick = dict(
        corpus="small",
        vocab_size=512,
        seq_len=32,
        prompt_length=8,
        eval_windows=16,
        teacher=_model(64, 2, 2),
        student=_model(32, 1, 1),
        steps=12,
        batch_size=8,
        warmup_steps=2,
        sample_prompts=8,
        eval_batch_size=16,
        eval_every=6,
        log_every=4,
        checkpoint_every=6,
    )
    quick_teacher = dict(steps=20, learning_rate=3e-3, seed=0)
    if arg not in (None, "", "quick", "cached"):
        raise ValueError(f"Unknown config argument {arg!r}; use 'quick', 'cached' or nothing.")
    if arg == "cached":
        config.student_runs = ("scratch", "kd", "kd_cached", "gkd")
        return config
    config = finish(config, arg, **quick)
    if arg == "quick":
        config.teacher.update(quick_teacher)
    return config
