r"""Training-time augmentation on NumPy batches, seeded per ``(seed, step)``.

Function matching (Beyer et al., 2022): the teacher and the student see the same
augmented view of every example (the same crop, flip and mixup), and distillation
runs for long schedules. :func:`jaxkd.make_train_step` feeds ``batch["image"]`` to
the frozen teacher and to the student alike, so augmenting that array in the loader
makes the two views consistent with no change to the step. For contrast, the
*inconsistent* variant gives the teacher its own, independently drawn view in
``batch["teacher_image"]``; the step then needs
``make_train_step(..., teacher_input_key="teacher_image")`` (without it the teacher
reads ``batch["image"]`` and the extra key is ignored: a consistent run).

Inputs are channels-last batches: images ``[B, H, W, C]`` (random crop with
padding, horizontal flip, mixup) and 1-D signals ``[B, L]`` or ``[B, L, C]``
(random shift, i.e. a crop with padding along ``L``, and mixup; no flip). Per
example, in this order:

1. crop: pad each spatial axis by ``p`` on both sides (``padding_mode="zero"``:
   zeros, as in He et al.'s CIFAR recipe, where zero is the mean of standardized
   inputs; ``"reflect"``: mirrored about the edge sample, which is not repeated,
   as ``np.pad(mode="reflect")``) and keep the window of the original size at a
   uniform offset in ``[0, 2p]`` per axis, so a shift of at most ``p``;
2. flip: reverse the width axis with probability 1/2 (images only);
3. mixup (Zhang et al., 2018) over the batch: one
   :math:`\lambda \sim \mathrm{Beta}(a, a)` per batch and a random permutation
   ``partner`` of it, :math:`x_i \leftarrow \lambda x_i + (1 - \lambda)
   x_{\mathrm{partner}(i)}`. Labels are left as they are: a cross-entropy term on
   them would be wrong, so the runner allows mixup only for a distilled student
   with ``distill.alpha = 1`` (see :func:`check_config`).

Every random choice is a function of ``(seed, step, view)`` alone
(:func:`draw_view`; ``step`` is the loader's batch index, 0 for the first batch,
i.e. the ``TrainState.step`` that consumes it), so a resumed run sees exactly the
views an uninterrupted one would. Crop offsets and flips are drawn for the whole
global batch and each process keeps its slice: the views do not depend on the
number of processes. Mixup pairs examples within a process's slice (one process:
within the global batch); ``lambda`` is the same on every process.

References:
  Knowledge distillation: A good teacher is patient and consistent. Lucas Beyer,
  Xiaohua Zhai, Amelie Royer, Larisa Markeeva, Rohan Anil, Alexander Kolesnikov.
  CVPR 2022. https://arxiv.org/abs/2106.05237

  mixup: Beyond Empirical Risk Minimization. Hongyi Zhang, Moustapha Cisse, Yann N.
  Dauphin, David Lopez-Paz. ICLR 2018. https://arxiv.org/abs/1710.09412

  Deep Residual Learning for Image Recognition. Kaiming He, Xiangyu Zhang,
  Shaoqing Ren, Jian Sun. CVPR 2016. https://arxiv.org/abs/1512.03385
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

import jaxkd
from experiments.errors import ExperimentError

Batch = dict[str, np.ndarray]

PADDING_MODES = ("zero", "reflect")
# Separates augmentation streams from the loader's epoch permutations (same seed).
_STREAM = 0x61756776  # "augv"
STUDENT_VIEW, TEACHER_VIEW = 0, 1
# Runs whose loss has a cross-entropy term on the integer labels: never mixed up.
_LABEL_RUNS = ("teacher", "scratch")


@dataclasses.dataclass(frozen=True)
class Augmentation:
    r"""What to do to the inputs of every training batch; the runner's ``config.augment``.

    Attributes:
      crop_padding: ``p >= 0``; a random crop (shift) of at most ``p`` per spatial
        axis; 0 disables it.
      padding_mode: ``"zero"`` or ``"reflect"``, see the module docstring.
      flip: random horizontal flips (images ``[B, H, W, C]`` only).
      mixup_alpha: ``a >= 0``; mixup with :math:`\lambda \sim \mathrm{Beta}(a, a)`;
        0 disables it.
      consistent: teacher and student share the view in ``input_key``; if False the
        teacher gets its own view in ``teacher_input_key``.
      input_key: batch key of the inputs to augment.
      teacher_input_key: batch key of the teacher's view when not ``consistent``.
    """

    crop_padding: int = 0
    padding_mode: str = "zero"
    flip: bool = False
    mixup_alpha: float = 0.0
    consistent: bool = True
    input_key: str = "image"
    teacher_input_key: str = "teacher_image"

    def __post_init__(self):
        if isinstance(self.crop_padding, bool) or int(self.crop_padding) != self.crop_padding:
            raise TypeError(f"`crop_padding` must be an integer, got {self.crop_padding!r}.")
        if self.crop_padding < 0:
            raise ValueError(f"`crop_padding` must be >= 0, got {self.crop_padding}.")
        object.__setattr__(self, "crop_padding", int(self.crop_padding))
        if self.padding_mode not in PADDING_MODES:
            raise ValueError(
                f"`padding_mode` must be one of {PADDING_MODES}, got {self.padding_mode!r}."
            )
        if not (np.isfinite(self.mixup_alpha) and self.mixup_alpha >= 0):
            raise ValueError(f"`mixup_alpha` must be finite and >= 0, got {self.mixup_alpha}.")
        if self.input_key == self.teacher_input_key:
            raise ValueError(
                f"`teacher_input_key` must differ from `input_key`, both {self.input_key!r}."
            )

    @property
    def active(self) -> bool:
        """Whether any input is changed: a crop, flips or mixup."""
        return bool(self.crop_padding or self.flip or self.mixup_alpha)


@dataclasses.dataclass(frozen=True)
class View:
    """The random choices of one augmented view of a batch of ``B`` examples.

    Attributes:
      offsets: int64 [B, S]: the window's start in the padded input along each of the
        ``S`` spatial axes, in ``[0, 2p]``; ``p`` is the unshifted window.
      flips: bool [B]: which examples are flipped horizontally.
      mixup_lambda: the weight of each example itself; 1.0 without mixup.
      partner: int64 [B], a permutation of ``range(B)``: each example's mixup partner.
    """

    offsets: np.ndarray
    flips: np.ndarray
    mixup_lambda: float
    partner: np.ndarray


def spatial_axes(inputs: np.ndarray) -> tuple[int, ...]:
    """The spatial axes of channels-last ``inputs``: (1, 2) for ``[B, H, W, C]``,
    (1,) for ``[B, L]`` and ``[B, L, C]``.

    Raises:
      ValueError: for another rank.
    """
    ndim = np.ndim(inputs)
    if ndim == 4:
        return (1, 2)
    if ndim in (2, 3):
        return (1,)
    raise ValueError(
        f"`inputs` must be images [B, H, W, C] or signals [B, L] / [B, L, C], got shape "
        f"{np.shape(inputs)}."
    )


def draw_view(
    global_batch_size: int,
    *,
    seed: int,
    step: int,
    view: int = STUDENT_VIEW,
    num_spatial_axes: int,
    augmentation: Augmentation,
    local: slice = slice(None),
) -> View:
    """Draws one view's random choices, a function of ``(seed, step, view)`` only.

    Args:
      global_batch_size: examples in the global batch, ``G``.
      seed: non-negative integer seed of the run.
      step: non-negative batch index (0 for the first batch).
      view: :data:`STUDENT_VIEW` (0; also the teacher's when consistent) or
        :data:`TEACHER_VIEW` (1).
      num_spatial_axes: ``S``, 2 for images, 1 for signals.
      augmentation: what to draw; disabled parts draw nothing (offsets ``p``, no
        flips, ``lambda = 1``, identity partner).
      local: this process's slice of the global batch, ``B`` examples.

    Returns:
      A :class:`View` of this process's ``B`` examples.
    """
    for arg_name, value in (("seed", seed), ("step", step), ("view", view)):
        if int(value) != value or value < 0:
            raise ValueError(f"`{arg_name}` must be a non-negative integer, got {value!r}.")
    rng = np.random.default_rng(
        np.random.SeedSequence([int(seed), int(step)], spawn_key=(_STREAM, int(view)))
    )
    padding = augmentation.crop_padding
    offsets = rng.integers(0, 2 * padding + 1, size=(global_batch_size, num_spatial_axes))
    flips = rng.random(global_batch_size) < 0.5
    if not augmentation.flip:
        flips = np.zeros_like(flips)
    local_size = len(range(global_batch_size)[local])
    if augmentation.mixup_alpha:
        mixup_lambda = float(rng.beta(augmentation.mixup_alpha, augmentation.mixup_alpha))
        partner = rng.permutation(local_size)
    else:
        mixup_lambda, partner = 1.0, np.arange(local_size)
    return View(offsets[local].astype(np.int64), flips[local], mixup_lambda, partner)


def pad_and_crop(
    inputs: np.ndarray, offsets: np.ndarray, *, padding: int, padding_mode: str = "zero"
) -> np.ndarray:
    r"""Crops a window of the input's size from each padded example.

    .. math::
        y_i[j] = \mathrm{pad}_p(x_i)[j + o_i] \quad \text{for every spatial index } j

    Args:
      inputs: images [B, H, W, C] or signals [B, L] / [B, L, C].
      offsets: int [B, S] window starts in ``[0, 2 * padding]`` (``S`` spatial axes).
      padding: ``p >= 0`` samples of padding on both sides of each spatial axis.
      padding_mode: ``"zero"`` or ``"reflect"``.

    Returns:
      An array of the shape and dtype of ``inputs``.
    """
    inputs = np.asarray(inputs)
    axes = spatial_axes(inputs)
    offsets = np.asarray(offsets)
    if offsets.shape != (inputs.shape[0], len(axes)):
        raise ValueError(
            f"`offsets` must have shape [B, S] = {(inputs.shape[0], len(axes))} for `inputs` "
            f"{inputs.shape}, got {offsets.shape}."
        )
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"`padding_mode` must be one of {PADDING_MODES}, got {padding_mode!r}.")
    if offsets.size and (offsets.min() < 0 or offsets.max() > 2 * padding):
        raise ValueError(
            f"`offsets` must lie in [0, 2 * padding] = [0, {2 * padding}], got values in "
            f"[{offsets.min()}, {offsets.max()}]."
        )
    if padding == 0:
        return inputs.copy()
    widths = [(0, 0)] * inputs.ndim
    for axis in axes:
        widths[axis] = (padding, padding)
    padded = np.pad(inputs, widths, mode="constant" if padding_mode == "zero" else "reflect")
    # One fancy index: index arrays broadcast to [B, *spatial] (channels are sliced).
    batch = np.arange(inputs.shape[0]).reshape((-1,) + (1,) * len(axes))
    index = [batch]
    for position, axis in enumerate(axes):
        shape = [1] * (len(axes) + 1)
        shape[0], shape[position + 1] = -1, inputs.shape[axis]
        window = offsets[:, position : position + 1] + np.arange(inputs.shape[axis])
        index.append(window.reshape(shape))
    return padded[tuple(index)]


def horizontal_flip(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """Reverses the width axis of the images where ``flips`` is True.

    Args:
      images: [B, H, W, C].
      flips: bool [B].

    Returns:
      [B, H, W, C] of the images' dtype: ``images[i, :, ::-1]`` where ``flips[i]``,
      else ``images[i]``.
    """
    images = np.asarray(images)
    flips = np.asarray(flips)
    if images.ndim != 4:
        raise ValueError(
            f"Flips are for images [B, H, W, C]; got `images` of shape {images.shape} "
            "(a 1-D signal is not flipped)."
        )
    if flips.shape != images.shape[:1] or flips.dtype != bool:
        raise ValueError(
            f"`flips` must be bool [B] = {images.shape[:1]}, got {flips.dtype} {flips.shape}."
        )
    return np.where(flips[:, None, None, None], images[:, :, ::-1], images)


def mixup(inputs: np.ndarray, partner: np.ndarray, *, mixup_lambda: float) -> np.ndarray:
    r"""Mixes every example with its partner.

    .. math::
        y_i = \lambda x_i + (1 - \lambda) x_{\mathrm{partner}(i)}

    Args:
      inputs: floating [B, ...].
      partner: int [B], a permutation of ``range(B)``.
      mixup_lambda: :math:`\lambda \in [0, 1]`.

    Returns:
      An array of the shape and dtype of ``inputs``, computed in that dtype.
    """
    inputs = np.asarray(inputs)
    partner = np.asarray(partner)
    if not np.issubdtype(inputs.dtype, np.floating):
        raise TypeError(f"`inputs` must be floating to mix, got {inputs.dtype}.")
    if partner.shape != inputs.shape[:1] or not np.array_equal(
        np.sort(partner), np.arange(len(inputs))
    ):
        raise ValueError(
            f"`partner` must be a permutation of range({len(inputs)}), got shape {partner.shape}."
        )
    if not 0.0 <= mixup_lambda <= 1.0:
        raise ValueError(f"`mixup_lambda` must lie in [0, 1], got {mixup_lambda}.")
    weight = inputs.dtype.type(mixup_lambda)
    return weight * inputs + (inputs.dtype.type(1) - weight) * inputs[partner]


def apply_view(inputs: np.ndarray, view: View, *, augmentation: Augmentation) -> np.ndarray:
    """Crop, then flip, then mixup of ``inputs`` [B, ...] with one view's choices."""
    inputs = np.asarray(inputs)
    if augmentation.flip and inputs.ndim != 4:
        raise ValueError(
            f"`flip=True` needs images [B, H, W, C]; got inputs of shape {inputs.shape} "
            "(1-D signals are shifted, never flipped)."
        )
    if augmentation.crop_padding:
        inputs = pad_and_crop(
            inputs,
            view.offsets,
            padding=augmentation.crop_padding,
            padding_mode=augmentation.padding_mode,
        )
    if augmentation.flip:
        inputs = horizontal_flip(inputs, view.flips)
    if augmentation.mixup_alpha:
        inputs = mixup(inputs, view.partner, mixup_lambda=view.mixup_lambda)
    return inputs


def augment_batch(
    batch: Mapping[str, np.ndarray],
    augmentation: Augmentation,
    *,
    seed: int,
    step: int,
    global_batch_size: int | None = None,
    local: slice = slice(None),
) -> Batch:
    """The batch with its inputs augmented: the view of ``(seed, step)``.

    Args:
      batch: ``{augmentation.input_key: [B, ...], ...}``, this process's slice
        ``local`` of a global batch.
      augmentation: what to do.
      seed: non-negative integer seed of the run.
      step: the batch's index, 0 for the first batch.
      global_batch_size: ``G``; default ``B`` (one process).
      local: this process's slice of the global batch, of ``B`` examples.

    Returns:
      A new dict: ``batch`` with ``input_key`` replaced by the (student's and, when
      consistent, teacher's) view, plus, when not ``consistent``, the teacher's own
      view under ``teacher_input_key``. Other entries (labels) are unchanged.
    """
    key = augmentation.input_key
    if key not in batch:
        raise KeyError(f"The batch has no {key!r} to augment; it has {sorted(batch)}.")
    inputs = np.asarray(batch[key])
    global_batch_size = len(inputs) if global_batch_size is None else global_batch_size
    if len(range(global_batch_size)[local]) != len(inputs):
        raise ValueError(
            f"The slice {local} of a global batch of {global_batch_size} does not hold the "
            f"{len(inputs)} examples of `batch[{key!r}]` {inputs.shape}."
        )
    out = dict(batch)
    if not augmentation.active:
        return out
    num_axes = len(spatial_axes(inputs))
    views = [STUDENT_VIEW] if augmentation.consistent else [STUDENT_VIEW, TEACHER_VIEW]
    keys = [key, augmentation.teacher_input_key]
    for out_key, view in zip(keys, views, strict=False):
        drawn = draw_view(
            global_batch_size,
            seed=seed,
            step=step,
            view=view,
            num_spatial_axes=num_axes,
            augmentation=augmentation,
            local=local,
        )
        out[out_key] = apply_view(inputs, drawn, augmentation=augmentation)
    return out


# The runner's config ------------------------------------------------------------


def _augment_field(config) -> Mapping[str, Any]:
    augment = config.get("augment")
    return {} if augment is None else augment


def from_config(config) -> Augmentation:
    """The :class:`Augmentation` of ``config.augment`` (all off when absent).

    Fields: ``crop_padding``, ``flip``, ``mixup_alpha``, ``consistent`` and,
    optionally, ``padding_mode`` (default ``"zero"``).

    Raises:
      ExperimentError: naming the field, for a value out of range.
    """
    augment = _augment_field(config)
    try:
        return Augmentation(
            crop_padding=augment.get("crop_padding", 0),
            padding_mode=augment.get("padding_mode", "zero"),
            flip=bool(augment.get("flip", False)),
            mixup_alpha=float(augment.get("mixup_alpha", 0.0)),
            consistent=bool(augment.get("consistent", True)),
        )
    except (TypeError, ValueError) as error:
        raise ExperimentError(f"Bad config: augment: {error}") from None


def check_config(config, input_shape: tuple[int, ...] | None = None) -> Augmentation:
    """Refuses an augmentation the runner cannot use; returns it.

    Mixup changes the inputs but not the integer labels, so a cross-entropy term
    on those labels would train on wrong targets. Mixup therefore applies to the
    ``distilled`` student alone (teacher and scratch runs get crop and flip only),
    and is refused unless that student's objective ignores the labels:
    ``distill.alpha = 1`` and a distillation loss that takes no labels (not
    ``dkd``). A cached teacher holds its outputs on un-augmented examples, so any
    augmentation is refused with a ``distilled_cached`` run.

    Args:
      config: the experiment config; ``config.augment`` may be absent (all off).
      input_shape: the shape of one model input (e.g. the dataset spec's), to
        refuse flips of 1-D signals; None skips that check.

    Raises:
      ExperimentError: naming the fields and their values.
    """
    augmentation = from_config(config)

    def fail(message):
        raise ExperimentError(f"Bad config: {message}")

    if input_shape is not None and augmentation.flip and len(input_shape) != 3:
        fail(
            f"augment.flip=True needs images [H, W, C]; dataset={config.dataset!r} has inputs "
            f"of shape {tuple(input_shape)} (1-D signals are shifted, not flipped)."
        )
    if not augmentation.consistent and not augmentation.active:
        fail(
            "augment.consistent=False gives the teacher its own view, but no augmentation is "
            "on (crop_padding=0, flip=False, mixup_alpha=0): both views would be the inputs."
        )
    if augmentation.active and "distilled_cached" in tuple(config.get("student_runs", ())):
        fail(
            "augment (crop_padding, flip or mixup_alpha) with the 'distilled_cached' run: the "
            "cache holds the teacher's outputs on un-augmented examples; drop one of them."
        )
    if augmentation.mixup_alpha:
        alpha = config.distill.alpha
        if callable(alpha) or float(alpha) != 1.0:
            fail(
                f"augment.mixup_alpha={augmentation.mixup_alpha} with distill.alpha={alpha}: "
                "mixup mixes the inputs but not the integer labels, so the cross-entropy "
                "term would train on wrong targets; set distill.alpha=1.0 (pure "
                "distillation, the function-matching recipe) or augment.mixup_alpha=0."
            )
        try:  # The objective knows whether its loss reads the labels.
            jaxkd.distillation_objective(
                config.distill.loss,
                alpha=1.0,
                temperature=config.distill.temperature,
                label_key=None,
                loss_kwargs=config.distill.loss_kwargs.to_dict(),
            )
        except ValueError as error:
            fail(
                f"augment.mixup_alpha={augmentation.mixup_alpha} with "
                f"distill.loss={config.distill.loss!r}, which reads the labels: {error}"
            )
    return augmentation


def for_run(
    config, kind: str | None, *, input_shape: tuple[int, ...] | None = None
) -> Augmentation | None:
    """The augmentation of one run of the runner, or None when it has none.

    Crop and flip apply to every run; mixup and an inconsistent teacher view to the
    ``distilled`` run only (the others have no teacher forward and train on the
    labels). ``kind=None`` (a caller that does not say which run) is accepted
    without mixup or inconsistent views only. ``input_shape``: as in
    :func:`check_config`.

    Raises:
      ExperimentError: see :func:`check_config`; for ``kind=None`` with mixup or
        ``consistent=False``; for a ``distilled_cached`` run with augmentation.
    """
    augmentation = check_config(config, input_shape)
    if not augmentation.active:
        return None
    if kind is None and (augmentation.mixup_alpha or not augmentation.consistent):
        raise ExperimentError(
            f"augment.mixup_alpha={augmentation.mixup_alpha} and augment.consistent="
            f"{augmentation.consistent} apply to the distilled run alone: the loader must be "
            "told the run's kind."
        )
    if kind == "distilled_cached":
        raise ExperimentError(
            "Bad config: augment with a distilled_cached run (its teacher outputs are of "
            "un-augmented examples)."
        )
    if kind in _LABEL_RUNS:
        augmentation = dataclasses.replace(augmentation, mixup_alpha=0.0, consistent=True)
        if not augmentation.active:
            return None
    return augmentation


def teacher_input_key(config, kind: str) -> str | None:
    """The ``teacher_input_key`` of ``make_train_step`` for run ``kind``: the teacher's
    own view for an inconsistent ``distilled`` run, else None (the student's inputs)."""
    augmentation = from_config(config)
    if kind == "distilled" and augmentation.active and not augmentation.consistent:
        return augmentation.teacher_input_key
    return None


def run_fields(config, kind: str) -> dict[str, Any]:
    """The ``augment.*`` fields run ``kind``'s results depend on (for
    :mod:`experiments.run_config`); empty without augmentation, so that runs recorded
    before augmentation existed stay valid."""
    augmentation = from_config(config)
    if not augmentation.active:
        return {}
    fields = {
        "augment.crop_padding": augmentation.crop_padding,
        "augment.padding_mode": augmentation.padding_mode,
        "augment.flip": augmentation.flip,
    }
    if kind not in _LABEL_RUNS:
        fields["augment.mixup_alpha"] = augmentation.mixup_alpha
        fields["augment.consistent"] = augmentation.consistent
    return fields
