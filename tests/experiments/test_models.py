"""Tests of the reference models: shapes, dtypes, parameter counts, BatchNorm, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.models import (
    MODEL_NAMES,
    CifarResNet,
    MobileNetV2,
    get_model,
    init_model,
    make_apply,
    param_count,
)
from experiments.models.wrn import PreActBlock, WideResNet

BATCH = 2
NUM_CLASSES = 7

INPUT_SHAPES = {
    "mlp_1200_1200": (BATCH, 28, 28, 1),
    "mlp_800_800": (BATCH, 28, 28, 1),
    "mlp_30_30": (BATCH, 28, 28, 1),
    "mnist1d_cnn": (BATCH, 40),
    "mnist1d_mlp": (BATCH, 40),
    "resnet20": (BATCH, 32, 32, 3),
    "resnet56": (BATCH, 32, 32, 3),
    "resnet8x4": (BATCH, 32, 32, 3),
    "resnet32x4": (BATCH, 32, 32, 3),
    "wrn_40_2": (BATCH, 32, 32, 3),
    "wrn_16_2": (BATCH, 32, 32, 3),
    "mobilenet_small": (BATCH, 32, 32, 3),
}
BATCH_NORM_MODELS = {
    "resnet20",
    "resnet56",
    "resnet8x4",
    "resnet32x4",
    "wrn_40_2",
    "wrn_16_2",
    "mobilenet_small",
}


def _inputs(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _abstract_params(model, shape):
    sample = jax.ShapeDtypeStruct(shape, jnp.float32)
    return jax.eval_shape(lambda x: init_model(model, jax.random.key(0), x), sample)


def _hinton_mlp_count(sizes):
    return sum(
        fan_in * fan_out + fan_out for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)
    )


def test_every_registered_name_has_a_test_input():
    assert set(MODEL_NAMES) == set(INPUT_SHAPES) | {"mlp"}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", sorted(INPUT_SHAPES))
def test_logits_shape_and_dtype(name, dtype):
    # Traced only (jax.eval_shape): compiling every model on CPU is the slow part.
    model = get_model(name, NUM_CLASSES, dtype=dtype)
    shape = INPUT_SHAPES[name]
    params, state = _abstract_params(model, shape)
    assert set(state) == ({"batch_stats"} if name in BATCH_NORM_MODELS else set())
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves((params, state)))
    apply = make_apply(model)
    for train in (True, False):
        logits, new_state = jax.eval_shape(
            lambda p, s, x, train=train: apply(p, s, x, train=train, rng=jax.random.key(1)),
            params,
            state,
            jax.ShapeDtypeStruct(shape, jnp.float32),
        )
        assert logits.shape == (BATCH, NUM_CLASSES)
        assert logits.dtype == jnp.float32
        assert jax.tree.structure(new_state) == jax.tree.structure(state)
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new_state))


def _check_train_forward(model, params, state, shape):
    logits, new_state = jax.jit(make_apply(model), static_argnames="train")(
        params, state, _inputs(shape), train=True, rng=jax.random.key(1)
    )
    assert logits.shape == (shape[0], model.num_classes)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert jax.tree.structure(new_state) == jax.tree.structure(state)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new_state))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("name", ["mlp_1200_1200", "mnist1d_cnn", "resnet8x4"])
def test_train_forward_is_finite(name, dtype):
    # Params are float32 whatever the computation dtype, so one (cached) init serves both.
    shape = INPUT_SHAPES[name]
    params, state = init_model(get_model(name, NUM_CLASSES), jax.random.key(0), jnp.zeros(shape))
    _check_train_forward(get_model(name, NUM_CLASSES, dtype=dtype), params, state, shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_mobilenet_blocks_train_forward_is_finite(dtype):
    # Two stages cover every block variant (no expansion, expansion, stride 2, residual);
    # compiling the initializer of the full network takes tens of seconds on CPU.
    stages = ((1, 16, 1, 1), (6, 24, 2, 2))
    shape = (BATCH, 16, 16, 3)
    model = MobileNetV2(NUM_CLASSES, width_multiplier=0.5, stages=stages, last_features=64)
    params, state = init_model(model, jax.random.key(0), jnp.zeros(shape))
    _check_train_forward(model.clone(dtype=dtype), params, state, shape)


def test_bfloat16_logits_close_to_float32():
    x = _inputs(INPUT_SHAPES["mnist1d_cnn"])
    variables = {
        "params": init_model(get_model("mnist1d_cnn", NUM_CLASSES), jax.random.key(0), x)[0]
    }
    f32 = get_model("mnist1d_cnn", NUM_CLASSES).apply(variables, x, train=False)
    bf16_model = get_model("mnist1d_cnn", NUM_CLASSES, dtype=jnp.bfloat16)
    bf16 = bf16_model.apply(variables, x, train=False)
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, f32, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(
    "name, published",
    # Tian et al. (2020), "Contrastive Representation Distillation", CIFAR-100 tables.
    [("resnet20", 0.28e6), ("resnet56", 0.86e6), ("resnet8x4", 1.23e6), ("resnet32x4", 7.43e6)],
)
def test_cifar_resnet_param_counts_match_published(name, published):
    params, _ = _abstract_params(get_model(name, 100), INPUT_SHAPES[name])
    assert abs(param_count(params) - published) <= 0.02 * published


def test_cifar_resnet_param_counts_exact():
    # Computed by hand for resnet8x4: stem 864 + 64, stage widths 64/128/256 with a
    # 1x1-conv + BN shortcut in every stage, head 256 * 100 + 100.
    params, _ = _abstract_params(get_model("resnet8x4", 100), INPUT_SHAPES["resnet8x4"])
    assert param_count(params) == 1_233_540


def _wrn_reference_count(depth, widen_factor, num_classes):
    """Parameters of the CRD benchmark's WRN (RepDistiller's models/wrn.py), layer by
    layer: a 3x3 stem conv to 16 channels; per block BN(in), 3x3 conv in->out, BN(out),
    3x3 conv out->out and a 1x1 conv shortcut where in != out; a final BN and the
    classifier. Convolutions have no bias; a BN has a scale and a bias."""
    count, channels = 3 * 16 * 9, 16
    for width in (16 * widen_factor, 32 * widen_factor, 64 * widen_factor):
        for _ in range((depth - 4) // 6):
            count += 2 * channels + channels * width * 9 + 2 * width + width * width * 9
            count += channels * width if channels != width else 0
            channels = width
    return count + 2 * channels + channels * num_classes + num_classes


@pytest.mark.parametrize(
    "name, depth, published",
    # 2.26M and 0.70M, as the CRD benchmark's networks are usually counted.
    [("wrn_40_2", 40, 2.26e6), ("wrn_16_2", 16, 0.70e6)],
)
def test_wrn_param_counts_match_the_reference_layout(name, depth, published):
    params, _ = _abstract_params(get_model(name, 100), INPUT_SHAPES[name])
    assert param_count(params) == _wrn_reference_count(depth, 2, 100)
    assert param_count(params) == {"wrn_40_2": 2_255_156, "wrn_16_2": 703_284}[name]
    assert abs(param_count(params) - published) <= 0.005 * published


def _conv_nhwc(x, kernel, stride):
    """float64 'same'-padded convolution, [B, H, W, C] * [k, k, C, O], pad (k - 1) // 2."""
    k = kernel.shape[0]
    pad = (k - 1) // 2
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out_h = (x.shape[1] - k) // stride + 1
    out_w = (x.shape[2] - k) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[-1]))
    for i in range(k):
        for j in range(k):
            patch = x[:, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
            out += np.einsum("bhwc,co->bhwo", patch, kernel[i, j])
    return out


def test_preact_block_matches_a_numpy_reference():
    # Width 4 -> 6 at stride 2: the shortcut is a 1x1 conv of relu(bn(x)), not of x.
    block = PreActBlock(6, strides=2)
    x = np.asarray(_inputs((2, 6, 6, 4)), np.float64)
    shapes = jax.eval_shape(lambda: block.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda leaf: rng.normal(size=leaf.shape), shapes["params"])
    stats = {  # running statistics away from their (0, 1) init
        name: {
            "mean": rng.normal(size=leaf["mean"].shape),
            "var": rng.uniform(0.5, 2.0, leaf["var"].shape),
        }
        for name, leaf in shapes["batch_stats"].items()
    }
    variables = jax.tree.map(
        lambda a: jnp.asarray(a, jnp.float32), {"params": params, "batch_stats": stats}
    )

    def bn(y, name):
        normalized = (y - stats[name]["mean"]) / np.sqrt(stats[name]["var"] + 1e-5)
        return normalized * params[name]["scale"] + params[name]["bias"]

    activated = np.maximum(bn(x, "bn_0"), 0.0)
    y = _conv_nhwc(activated, params["conv_0"]["kernel"], 2)
    y = _conv_nhwc(np.maximum(bn(y, "bn_1"), 0.0), params["conv_1"]["kernel"], 1)
    expected = y + _conv_nhwc(activated, params["shortcut_conv"]["kernel"], 2)
    apply = jax.jit(lambda v, x: block.apply(v, x, train=False))
    np.testing.assert_allclose(
        apply(variables, jnp.asarray(x, jnp.float32)), expected, rtol=1e-4, atol=1e-4
    )
    # Same width and stride: the identity shortcut, no shortcut parameters.
    same = jax.eval_shape(
        lambda: PreActBlock(4).init(jax.random.key(0), jnp.zeros((1, 6, 6, 4)), train=False)
    )
    assert "shortcut_conv" not in same["params"]


def test_bad_wrn_depth_or_width_raises():
    with pytest.raises(ValueError, match="6n"):
        WideResNet(depth=20, widen_factor=2, num_classes=10)
    with pytest.raises(ValueError, match="widen_factor"):
        WideResNet(depth=16, widen_factor=0, num_classes=10)


@pytest.mark.parametrize(
    "name, sizes",
    [
        ("mlp_1200_1200", (784, 1200, 1200, 10)),
        ("mlp_800_800", (784, 800, 800, 10)),
        ("mlp_30_30", (784, 30, 30, 10)),
        ("mnist1d_mlp", (40, 100, 100, 10)),
    ],
)
def test_mlp_param_counts_by_formula(name, sizes):
    shape = INPUT_SHAPES[name]
    params, state = _abstract_params(get_model(name, 10), shape)
    assert param_count(params) == _hinton_mlp_count(sizes)
    assert state == {}


def test_hinton_teacher_count_written_out():
    params, _ = _abstract_params(get_model("mlp_1200_1200", 10), (1, 784))
    assert param_count(params) == 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10


def test_mnist1d_cnn_param_count_and_channel_axis():
    params, _ = _abstract_params(get_model("mnist1d_cnn", 10), (BATCH, 40))
    # conv 1*25*5+25, conv 25*25*3+25 twice, dense (5 positions * 25 channels)*10+10.
    assert param_count(params) == 150 + 1900 + 1900 + 1260
    model = get_model("mnist1d_cnn", NUM_CLASSES)
    x = _inputs((BATCH, 40))
    variables = {"params": init_model(model, jax.random.key(0), x)[0]}
    flat = model.apply(variables, x, train=False)
    with_channel = model.apply(variables, x[..., None], train=False)
    np.testing.assert_array_equal(flat, with_channel)


def test_mobilenet_small_param_count():
    params, _ = _abstract_params(get_model("mobilenet_small", 100), (BATCH, 32, 32, 3))
    assert param_count(params) == 815_780
    # At width 1.0 the layer layout is the standard MobileNetV2 one (2.35M for 100 classes).
    params, _ = _abstract_params(MobileNetV2(100, width_multiplier=1.0), (BATCH, 32, 32, 3))
    assert param_count(params) == 2_351_972


def test_generic_mlp():
    model = get_model("mlp", 3, hidden_sizes=(16, 8))
    params, state = init_model(model, jax.random.key(0), jnp.zeros((BATCH, 5, 2)))
    assert param_count(params) == _hinton_mlp_count((10, 16, 8, 3))
    logits, _ = make_apply(model)(params, state, _inputs((BATCH, 5, 2)), train=False)
    assert logits.shape == (BATCH, 3)


def test_mlp_needs_hidden_sizes():
    with pytest.raises(ValueError, match="hidden_sizes"):
        get_model("mlp", 10)


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="resnet32x4") as error:
        get_model("resnet1000", 10)
    assert all(name in str(error.value) for name in MODEL_NAMES)


def test_bad_resnet_depth_raises():
    with pytest.raises(ValueError, match="6n"):
        CifarResNet(depth=21, widths=(16, 16, 32, 64), num_classes=10)


def test_batch_norm_stats_update_in_train_only():
    model = get_model("resnet8x4", NUM_CLASSES)
    x = _inputs(INPUT_SHAPES["resnet8x4"])
    params, state = init_model(model, jax.random.key(0), x)
    apply = jax.jit(make_apply(model), static_argnames="train")

    _, train_state = apply(params, state, x, train=True, rng=None)
    before, after = jax.tree.leaves(state), jax.tree.leaves(train_state)
    assert jax.tree.structure(train_state) == jax.tree.structure(state)
    assert all(np.any(b != a) for b, a in zip(before, after, strict=True))

    eval_logits, eval_state = apply(params, state, x, train=False, rng=None)
    for b, a in zip(before, jax.tree.leaves(eval_state), strict=True):
        np.testing.assert_array_equal(b, a)
    # Eval uses the running statistics: a batch of one gives the same logits.
    single, _ = apply(params, state, x[:1], train=False, rng=None)
    np.testing.assert_allclose(single, eval_logits[:1], rtol=1e-5, atol=1e-5)


def test_dropout_depends_on_rng_in_train_and_is_off_in_eval():
    model = get_model("mlp_1200_1200", NUM_CLASSES)
    x = _inputs(INPUT_SHAPES["mlp_1200_1200"])
    params, state = init_model(model, jax.random.key(0), x)
    apply = jax.jit(make_apply(model), static_argnames="train")

    first, _ = apply(params, state, x, train=True, rng=jax.random.key(1))
    again, _ = apply(params, state, x, train=True, rng=jax.random.key(1))
    other, _ = apply(params, state, x, train=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert np.any(np.abs(first - other) > 1e-3)

    eval_a, _ = apply(params, state, x, train=False, rng=jax.random.key(1))
    eval_b, _ = apply(params, state, x, train=False, rng=jax.random.key(2))
    eval_none, _ = apply(params, state, x, train=False, rng=None)
    np.testing.assert_array_equal(eval_a, eval_b)
    np.testing.assert_array_equal(eval_a, eval_none)
    assert np.any(np.abs(first - eval_a) > 1e-3)
