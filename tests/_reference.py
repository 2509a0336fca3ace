"""Float64 numpy references shared by the loss tests.

Written from the textbook definitions, independently of jaxkd and of ``jax.nn``:

* softened softmax (Hinton, Vinyals and Dean, 2015): ``p_i = exp(z_i / T) / sum_j exp(z_j / T)``,
  with ``exp(-inf) = 0``;
* Kullback-Leibler divergence ``KL(p || q) = sum_i p_i (log p_i - log q_i)`` with
  ``0 log 0 = 0``;
* Shannon entropy ``H(p) = -sum_i p_i log p_i`` in nats.

Each test file builds the references of its own functions on top of these.
"""

import numpy as np

# Temperatures used throughout: sharper than 1, 1, and the usual KD range.
TEMPERATURES = (0.5, 1.0, 2.0, 4.0, 10.0)

# A per-example shape [B, C] and a token-level shape [B, T, V].
SHAPES = ((4, 7), (2, 3, 7))

# A token mask for [2, 3, V] logits keeping 4 tokens: the kept tokens form a [4, V] array.
TOKEN_WHERE = np.array([[True, True, False], [False, True, True]])


def random_logits(seed: int, shape, *, scale: float = 3.0, dtype=np.float32) -> np.ndarray:
    """Gaussian logits of standard deviation ``scale``, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    return (scale * rng.standard_normal(shape)).astype(dtype)


def log_softmax(logits, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    """``z / T - log sum exp(z / T)`` in float64; ``-inf`` logits stay ``-inf``."""
    z = np.asarray(logits, np.float64) / temperature
    shift = np.max(z, axis=axis, keepdims=True)
    shifted = z - shift
    return shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))


def softmax(logits, temperature: float = 1.0, axis: int = -1) -> np.ndarray:
    """``exp(z_i / T) / sum_j exp(z_j / T)`` in float64."""
    return np.exp(log_softmax(logits, temperature, axis))


def kl(p, q, axis: int = -1) -> np.ndarray:
    """``KL(p || q) = sum_i p_i log(p_i / q_i)``, terms with ``p_i = 0`` are 0."""
    p = np.asarray(p, np.float64)
    q = np.asarray(q, np.float64)
    present = p > 0
    ratio = np.where(present, p, 1.0) / np.where(present, q, 1.0)
    return np.sum(np.where(present, p * np.log(ratio), 0.0), axis=axis)


def entropy(p, axis: int = -1) -> np.ndarray:
    """``H(p) = -sum_i p_i log p_i`` with ``0 log 0 = 0``."""
    p = np.asarray(p, np.float64)
    present = p > 0
    return -np.sum(np.where(present, p * np.log(np.where(present, p, 1.0)), 0.0), axis=axis)


def one_hot_logits(classes, num_classes: int = 7, *, magnitude: float = 1e4) -> np.ndarray:
    """Float32 logits whose softmax is (to float32 precision) one-hot on ``classes``."""
    hot = np.arange(num_classes) == np.asarray(classes)[:, None]
    return np.where(hot, magnitude, 0.0).astype(np.float32)


def extreme_logits(seed: int, shape=(4, 7)) -> np.ndarray:
    """Logits of +-1e4 with random signs (ties between maxima are common)."""
    return (1e4 * np.sign(random_logits(seed, shape))).astype(np.float32)
