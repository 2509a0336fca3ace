"""Quickstart: distill an MLP teacher into a small MLP student on scikit-learn's digits.

Runs in well under a minute on a 2-core CPU with no network:

    python experiments/quickstart.py

It trains a teacher, then the same small student twice with the same data order,
steps and optimizer: once from scratch on the labels, once by distillation
(Hinton et al.'s alpha * T^2 KL + (1 - alpha) * CE), and prints test accuracy,
agreement with the teacher and parameter counts. Whatever the numbers, they are
measured by this run.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits

import jaxkd


class MLP(nn.Module):
    """A ReLU MLP with optional dropout; ``[B, 64] -> [B, 10]``."""

    hidden: tuple[int, ...]
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, *, train: bool):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
            if self.dropout_rate:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(10)(x)


def load_data(seed: int = 0):
    """Digits scaled to [0, 1], split 80/20 with a seeded permutation."""
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    return (x[train], y[train]), (x[test], y[test])


def batches(x, y, *, batch_size: int, steps: int, seed: int):
    """``steps`` batches from a seeded stream of epoch permutations."""
    rng = np.random.default_rng(seed)
    order = np.array([], np.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = np.concatenate([order, rng.permutation(len(x))])
        take, order = order[:batch_size], order[batch_size:]
        yield {"image": x[take], "label": y[take]}


def train(model, objective, data, *, steps, seed, teacher_apply=None, teacher_params=None, lr=3e-3):
    """Trains ``model`` with ``objective``; returns its final ``TrainState``."""
    (x_train, y_train), _ = data
    params = model.init(jax.random.key(seed), x_train[:1], train=False)["params"]
    optimizer = optax.adam(lr)
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, rng=seed)
    step = jax.jit(
        jaxkd.make_train_step(jaxkd.linen_apply(model), teacher_apply, objective, optimizer),
        donate_argnums=0,
    )
    for batch in batches(x_train, y_train, batch_size=64, steps=steps, seed=seed):
        state, _ = step(state, teacher_params, batch)
    return state


def evaluate(model, state, data, teacher_apply, teacher_params):
    """Test accuracy and teacher agreement over the whole test split."""
    _, (x_test, y_test) = data
    eval_step = jaxkd.make_eval_step(jaxkd.linen_apply(model), teacher_apply)
    sums = jax.jit(eval_step)(state, teacher_params, {"image": x_test, "label": y_test})
    return jaxkd.summarize_eval(sums)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="training steps per model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--temperature", type=float, default=4.0)
    args = parser.parse_args(argv)

    start = time.perf_counter()
    data = load_data(args.seed)
    teacher = MLP(hidden=(256, 256), dropout_rate=0.2)
    student = MLP(hidden=(8,))
    supervised = jaxkd.cross_entropy_objective()

    teacher_state = train(teacher, supervised, data, steps=args.steps, seed=args.seed)
    teacher_params = {"params": teacher_state.params}
    teacher_apply = jaxkd.linen_teacher_apply(teacher)

    scratch = train(student, supervised, data, steps=args.steps, seed=args.seed + 1)
    distilled = train(
        student,
        jaxkd.hinton_objective(alpha=args.alpha, temperature=args.temperature),
        data,
        steps=args.steps,
        seed=args.seed + 1,
        teacher_apply=teacher_apply,
        teacher_params=teacher_params,
    )

    rows = [
        ("teacher MLP 64-256-256-10", teacher_state),
        ("student MLP 64-8-10, from scratch", scratch),
        (f"student MLP 64-8-10, distilled (T={args.temperature}, alpha={args.alpha})", distilled),
    ]
    print(f"\nscikit-learn digits, {args.steps} steps each, seed {args.seed}\n")
    print(f"| {'model':<52} | test accuracy | agreement with teacher | params |")
    print(f"|{'-' * 54}|---------------|------------------------|--------|")
    for name, state in rows:
        summary = evaluate(
            teacher if state is teacher_state else student,
            state,
            data,
            teacher_apply,
            teacher_params,
        )
        print(
            f"| {name:<52} | {summary['accuracy']:13.4f} | {summary['agreement']:22.4f} "
            f"| {jaxkd.count_params(state.params):6d} |"
        )
    print(f"\ntotal time {time.perf_counter() - start:.1f}s on {jax.devices()[0].platform}")
    return rows


if __name__ == "__main__":
    main()
