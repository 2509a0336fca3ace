"""Augmentation for function matching: crop, flip, mixup, seeded per (seed, step)."""

from __future__ import annotations

import dataclasses

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import jaxkd
from experiments import data, methods, models, train
from experiments.configs import base, mnist1d_function_matching
from experiments.data.augment import (
    TEACHER_VIEW,
    Augmentation,
    augment_batch,
    check_config,
    draw_view,
    for_run,
    horizontal_flip,
    mixup,
    pad_and_crop,
    run_fields,
    teacher_input_key,
)
from experiments.data.loader import TrainLoader
from experiments.errors import ExperimentError
from jaxkd.train._step import make_train_step

SERIAL = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
CROP_FLIP = Augmentation(crop_padding=2, flip=True)


def _images(shape=(8, 5, 6, 2), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _reference_crop(inputs, offsets, padding, mode):
    """float64, one element at a time: y[i, j] = x[i, reflect_or_zero(j + o_i - p)]."""
    inputs = np.asarray(inputs, np.float64)
    spatial = inputs.shape[1:3] if inputs.ndim == 4 else inputs.shape[1:2]
    out = np.zeros_like(inputs)
    for i in range(len(inputs)):
        for position in np.ndindex(*spatial):
            source = []
            for axis, (j, size) in enumerate(zip(position, spatial, strict=True)):
                u = j + offsets[i, axis] - padding
                if mode == "reflect":  # mirrored about the edge sample (padding < size)
                    u = -u if u < 0 else (2 * (size - 1) - u if u >= size else u)
                source.append(u)
            if all(0 <= u < size for u, size in zip(source, spatial, strict=True)):
                out[(i, *position)] = inputs[(i, *source)]
    return out


def test_the_same_seed_and_step_give_the_same_views():
    batch = {"image": _images(), "label": np.arange(8, dtype=np.int32)}
    augmentation = Augmentation(crop_padding=2, flip=True, mixup_alpha=0.4)
    first = augment_batch(batch, augmentation, seed=3, step=5)
    np.testing.assert_array_equal(
        first["image"], augment_batch(batch, augmentation, seed=3, step=5)["image"]
    )
    np.testing.assert_array_equal(first["label"], batch["label"])  # labels untouched
    for other in (dict(seed=3, step=6), dict(seed=4, step=5)):
        assert not np.allclose(first["image"], augment_batch(batch, augmentation, **other)["image"])
    # Turning flips on does not move the crops: every choice has its own draws.
    crop_only = dataclasses.replace(CROP_FLIP, flip=False)
    views = [
        draw_view(8, seed=3, step=5, num_spatial_axes=2, augmentation=a)
        for a in (crop_only, CROP_FLIP)
    ]
    np.testing.assert_array_equal(views[0].offsets, views[1].offsets)
    assert not views[0].flips.any() and views[1].flips.any()


@pytest.mark.parametrize(
    "shape, mode",
    [((4, 5, 6, 2), "zero"), ((4, 5, 6, 2), "reflect"), ((5, 7), "zero"), ((5, 7, 1), "reflect")],
    ids=["image-zero", "image-reflect", "signal", "signal-channel-reflect"],
)
def test_crop_is_a_shifted_window_of_the_padded_input(shape, mode):
    inputs = _images(shape)
    padding = 3
    augmentation = Augmentation(crop_padding=padding, padding_mode=mode)
    out = augment_batch({"image": inputs}, augmentation, seed=0, step=1)["image"]
    assert out.shape == inputs.shape and out.dtype == np.float32
    view = draw_view(
        shape[0],
        seed=0,
        step=1,
        num_spatial_axes=out.ndim - 2 if out.ndim == 4 else 1,
        augmentation=augmentation,
    )
    assert view.offsets.min() >= 0 and view.offsets.max() <= 2 * padding
    assert len(np.unique(view.offsets)) > 1  # shifts, not one fixed window
    np.testing.assert_array_equal(out, _reference_crop(inputs, view.offsets, padding, mode))
    # Offset p everywhere is the unshifted input.
    centre = np.full_like(view.offsets, padding)
    np.testing.assert_array_equal(
        pad_and_crop(inputs, centre, padding=padding, padding_mode=mode), inputs
    )


def test_flip_reverses_the_width_of_the_chosen_images_only():
    images = _images()
    flips = np.array([True, False] * 4)
    flipped = horizontal_flip(images, flips)
    for i in range(8):
        expected = images[i, :, ::-1] if flips[i] else images[i]
        np.testing.assert_array_equal(flipped[i], expected)
    with pytest.raises(ValueError, match=r"1-D signal is not flipped"):
        horizontal_flip(images[:, :, :, 0], flips)
    with pytest.raises(ValueError, match=r"`flip=True` needs images"):
        augment_batch({"image": images[:, 0]}, CROP_FLIP, seed=0, step=0)


def test_mixup_is_the_convex_combination_with_the_drawn_lambda():
    inputs = _images()
    augmentation = Augmentation(mixup_alpha=0.4)
    out = augment_batch({"image": inputs}, augmentation, seed=1, step=2)["image"]
    view = draw_view(8, seed=1, step=2, num_spatial_axes=2, augmentation=augmentation)
    lam, partner = view.mixup_lambda, view.partner
    assert 0.0 < lam < 1.0
    assert sorted(partner) == list(range(8)) and (partner != np.arange(8)).any()
    x = inputs.astype(np.float64)
    np.testing.assert_allclose(out, lam * x + (1 - lam) * x[partner], rtol=1e-6, atol=1e-6)
    lambdas = [
        draw_view(8, seed=1, step=s, num_spatial_axes=2, augmentation=augmentation).mixup_lambda
        for s in range(400)
    ]
    assert abs(np.mean(lambdas) - 0.5) < 0.05  # Beta(a, a) is symmetric about 1/2
    with pytest.raises(ValueError, match="permutation"):
        mixup(inputs, np.zeros(8, int), mixup_lambda=0.5)


def test_consistent_views_are_shared_and_inconsistent_ones_are_not():
    batch = {"image": _images(), "label": np.arange(8, dtype=np.int32)}
    consistent = augment_batch(batch, CROP_FLIP, seed=0, step=0)
    assert set(consistent) == {"image", "label"}  # the teacher reads "image" too
    inconsistent_aug = dataclasses.replace(CROP_FLIP, consistent=False)
    inconsistent = augment_batch(batch, inconsistent_aug, seed=0, step=0)
    assert set(inconsistent) == {"image", "teacher_image", "label"}
    np.testing.assert_array_equal(inconsistent["image"], consistent["image"])
    assert not np.allclose(inconsistent["teacher_image"], inconsistent["image"])
    teacher_view = draw_view(
        8, seed=0, step=0, view=TEACHER_VIEW, num_spatial_axes=2, augmentation=CROP_FLIP
    )
    expected = horizontal_flip(
        pad_and_crop(batch["image"], teacher_view.offsets, padding=2), teacher_view.flips
    )
    np.testing.assert_array_equal(inconsistent["teacher_image"], expected)


def test_the_step_feeds_the_teacher_its_input_key():
    def student_apply(params, model_state, inputs, *, train, rng):
        return inputs.reshape(len(inputs), -1)[:, :3] * params["w"], model_state

    def teacher_apply(teacher_params, inputs):
        return inputs.reshape(len(inputs), -1)[:, :3]

    def objective(student_out, teacher_out, batch, step):
        loss = jnp.mean((student_out - teacher_out) ** 2)
        return loss, {"loss": loss, "teacher_sum": jnp.sum(teacher_out)}

    batch = augment_batch(
        {"image": _images()}, dataclasses.replace(CROP_FLIP, consistent=False), seed=0, step=0
    )
    optimizer = optax.sgd(0.1)
    state = jaxkd.TrainState.create(params={"w": jnp.ones(())}, optimizer=optimizer, rng=0)
    for key, view in ((None, "image"), ("teacher_image", "teacher_image")):
        step = jax.jit(
            make_train_step(
                student_apply, teacher_apply, objective, optimizer, teacher_input_key=key
            )
        )
        _, metrics = step(state, None, batch)
        expected = batch[view].reshape(8, -1)[:, :3].sum()
        np.testing.assert_allclose(metrics["teacher_sum"], expected, rtol=1e-5)


def _loader(arrays, augmentation, **kwargs):
    return TrainLoader(
        arrays,
        global_batch_size=8,
        seed=1,
        read_options=SERIAL,
        augmentation=augmentation,
        **kwargs,
    )


def test_resumed_loader_reproduces_the_augmented_batches():
    arrays = {"image": _images((20, 5, 6, 2)), "label": np.arange(20, dtype=np.int32) % 10}
    augmentation = Augmentation(crop_padding=2, flip=True, mixup_alpha=0.4, consistent=False)
    loader = _loader(arrays, augmentation)
    for _ in range(3):  # past the end of the first epoch (2 batches)
        next(loader)
    state = loader.get_state()
    expected = [next(loader) for _ in range(2)]
    resumed = _loader(arrays, augmentation)
    resumed.set_state(state)
    plain = _loader(arrays, None)
    for k, batch in enumerate(expected, start=3):
        again = next(resumed)
        assert again.keys() == batch.keys() == {"image", "teacher_image", "label"}
        for key in batch:
            np.testing.assert_array_equal(again[key], batch[key])
        # Batch k is the un-augmented batch k with the views of (seed, step k).
        reference = augment_batch(plain.dataset[k], augmentation, seed=1, step=k)
        for key in batch:
            np.testing.assert_array_equal(batch[key], reference[key])
    # Crops and flips do not depend on the number of processes.
    parts = [
        _loader(arrays, CROP_FLIP, process_index=i, process_count=2).dataset[3] for i in range(2)
    ]
    whole = _loader(arrays, CROP_FLIP).dataset[3]
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), whole["image"])


def _config(**augment):
    config = base.get_base_config()
    config.augment.update(augment)
    return config


@pytest.mark.parametrize(
    "augment, distill, match",
    [
        (dict(mixup_alpha=0.2), dict(), r"augment.mixup_alpha=0.2 with distill.alpha=0.9"),
        (
            dict(mixup_alpha=0.2),
            dict(alpha=1.0, loss="dkd"),
            r"distill.loss='dkd', which reads the labels",
        ),
        (dict(flip=True), dict(), r"augment.flip=True needs images .* shape \(40,\)"),
        (dict(crop_padding=-1), dict(), r"augment: `crop_padding` must be >= 0"),
        (dict(crop_padding=2, padding_mode="wrap"), dict(), r"`padding_mode` must be one of"),
        (dict(consistent=False), dict(), r"augment.consistent=False .* no augmentation is on"),
    ],
)
def test_bad_config_is_refused_naming_the_fields(augment, distill, match):
    config = _config(**augment)
    config.distill.update(distill)
    with pytest.raises(ExperimentError, match=match):
        check_config(config, input_shape=(40,))


def test_which_run_gets_what():
    config = _config(crop_padding=2, mixup_alpha=0.2, consistent=False)
    config.distill.alpha = 1.0
    assert for_run(config, "distilled") == Augmentation(
        crop_padding=2, mixup_alpha=0.2, consistent=False
    )
    for kind in ("teacher", "scratch"):  # labels: no mixup, no teacher view
        assert for_run(config, kind) == Augmentation(crop_padding=2)
        assert teacher_input_key(config, kind) is None
        assert "augment.mixup_alpha" not in run_fields(config, kind)
    assert teacher_input_key(config, "distilled") == "teacher_image"
    assert run_fields(config, "distilled")["augment.consistent"] is False
    with pytest.raises(ExperimentError, match="told the run's kind"):
        for_run(config, None)
    config.student_runs = ("scratch", "distilled_cached")
    with pytest.raises(ExperimentError, match="'distilled_cached' run"):
        for_run(config, "scratch")
    off = base.get_base_config()
    assert for_run(off, "distilled") is None and run_fields(off, "distilled") == {}
    assert for_run(ml_collections.ConfigDict({"distill": off.distill}), None) is None


def test_function_matching_config_one_distilled_step(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)

    def split(num_examples):
        signals = rng.normal(size=(num_examples, 40)).astype(np.float32)
        return {"image": signals, "label": np.arange(num_examples, dtype=np.int32) % 10}

    splits = {"train": split(160), "test": split(32)}
    monkeypatch.setattr(data, "load_split", lambda name, split, *a, **k: splits[split])
    config = mnist1d_function_matching.get_config("quick")
    config.update(dict(steps=1, eval_every=1, log_every=1, checkpoint_every=1, batch_size=16))
    config.update(dict(eval_batch_size=16, throughput_batch_size=16))
    assert config.distill.alpha == 1.0 and config.augment.consistent
    train.validate(config, jax.device_count())
    experiment = train.Experiment(config, str(tmp_path))
    shifted = next(experiment.loader(0, kind="distilled"))["image"]
    unshifted = next(data.TrainLoader(experiment.train_arrays, global_batch_size=16, seed=0))
    assert shifted.shape == (16, 40) and not np.array_equal(shifted, unshifted["image"])
    # One distilled step (the runner's loader, step, eval and checkpoint) from an
    # untrained teacher: the teacher's own training is test_distill's business.
    teacher_model = experiment.model("teacher")
    params, model_state = models.init_model(
        teacher_model, jax.random.key(0), experiment.train_arrays["image"][:2]
    )
    teacher = (jaxkd.linen_teacher_apply(teacher_model), {"params": params, **model_state})
    jax.config.update("jax_disable_most_optimizations", True)  # compiles dominate: halve them
    try:
        result, _ = experiment.run(
            "distilled",
            0,
            experiment.model("student"),
            methods.distillation_objective(config),
            steps=1,
            learning_rate=config.learning_rate,
            teacher=teacher,
        )
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    assert result["steps"] == 1 and np.isfinite(result["accuracy"])
