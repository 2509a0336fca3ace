"""CIFAR-100 teacher/student pair configs, their models' feature paths and the anchors table.

Compiling a deep CIFAR network's train step takes seconds even with most XLA
optimizations off, so one pair (WRN-40-2 -> WRN-16-2, FitNet) runs a teacher step
and a distilled step on mock CIFAR-100; the distilled steps of the other pairs are
traced (the models, the objective and the optimizer put together), not compiled.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

import jaxkd
from experiments import data, methods, models, report, train
from experiments.configs import anchors, cifar100_pairs
from experiments.models.registry import FEATURE_LAYERS

PAIRS = cifar100_pairs.PAIRS
BATCH = 2
IMAGE = (32, 32, 3)
# mdistiller's per-pair DKD beta (configs/cifar100/dkd/*.yaml; 8 is its default).
DKD_BETA = {
    "resnet32x4-resnet8x4": 8.0,
    "wrn_40_2-wrn_16_2": 6.0,
    "resnet56-resnet20": 2.0,
    "resnet32x4-mobilenet_small": 8.0,
}


@pytest.fixture
def fast_compile():
    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", previous)


# Configs ----------------------------------------------------------------------


@pytest.mark.parametrize("pair_name", PAIRS)
def test_every_method_of_every_pair_builds_with_the_crd_recipe(pair_name):
    pair = PAIRS[pair_name]
    per_epoch = 50_000 // 64
    for method in cifar100_pairs.METHODS:
        config = cifar100_pairs.get_config(f"{pair_name},{method}")
        assert (config.teacher.model, config.student.model) == (pair.teacher, pair.student)
        assert (config.optimizer, config.momentum, config.nesterov) == ("sgd", 0.9, False)
        assert (config.weight_decay, config.batch_size, config.schedule) == (5e-4, 64, "step")
        assert config.steps == config.teacher.steps == 240 * per_epoch
        assert tuple(config.decay_steps) == (150 * per_epoch, 180 * per_epoch, 210 * per_epoch)
        assert config.decay_factor == 0.1
        expected_rate = 0.01 if pair.student == "mobilenet_small" else 0.05
        assert (config.learning_rate, config.teacher.learning_rate) == (expected_rate, 0.05)
        assert (config.augment.crop_padding, config.augment.flip) == (4, True)
        assert config.validation_fraction == 0.0
        assert (config.anchor.pair, config.anchor.method) == (pair.anchor, method)
        assert config.distill.temperature == 4.0
        feature = config.distill.feature
        if method == "none":
            assert tuple(config.student_runs) == ("scratch",)
        elif method == "kd":
            assert (config.distill.loss, config.distill.alpha, feature.loss) == ("kl", 0.9, "")
        elif method == "dkd":
            assert (config.distill.loss, config.distill.alpha) == ("dkd", 0.5)
            assert config.distill.loss_kwargs.to_dict() == {
                "alpha": 1.0,
                "beta": DKD_BETA[pair_name],
            }
        else:
            assert config.distill.alpha == 0.0 and feature.loss and feature.weight > 0
        # The runner's logit objective accepts the loss and its options.
        methods.logit_objective(config)


def test_the_runner_validates_and_builds_every_method():
    for method in cifar100_pairs.METHODS:
        config = cifar100_pairs.get_config(f"resnet32x4-mobilenet_small,{method}")
        train.validate(config, 8)
        methods.distillation_objective(config, 50_000)  # e.g. CRD's options by name


def _feature_configs(pair_name):
    return {
        m: cifar100_pairs.get_config(f"{pair_name},{m}").distill.feature
        for m in ("fitnet", "at", "sp", "rkd", "pkt", "crd")
    }


def test_feature_fields_of_each_method():
    feature = _feature_configs("resnet32x4-resnet8x4")
    layers_t, layers_s = FEATURE_LAYERS["resnet32x4"], FEATURE_LAYERS["resnet8x4"]
    # FitNet: hint on the middle stage through a trainable 1x1 regressor, weight 100.
    assert (feature["fitnet"].loss, feature["fitnet"].weight) == ("hint", 100.0)
    assert (feature["fitnet"].student, feature["fitnet"].teacher) == (
        layers_s["stage2"],
        layers_t["stage2"],
    )
    assert feature["fitnet"].projector == "linear"
    # SP on the last stage, 3000; CRD on the pooled embedding, 0.8, with its options.
    assert (feature["sp"].loss, feature["sp"].weight, feature["sp"].student) == (
        "sp",
        3000.0,
        layers_s["stage3"],
    )
    assert (feature["crd"].loss, feature["crd"].weight, feature["crd"].teacher) == (
        "crd",
        0.8,
        "pooled",
    )
    assert feature["crd"].loss_kwargs.to_dict() == {
        "feature_dim": 128,
        "num_negatives": 16384,
        "nce_temperature": 0.07,
        "momentum": 0.5,
    }
    # PKT: the reference's weight 30000 on its 1/B-scaled loss is 30000 / 64 on jaxkd's.
    assert feature["pkt"].loss == "pkt"
    assert math.isclose(feature["pkt"].weight, 30000.0 / 64)
    quick = cifar100_pairs.get_config("resnet32x4-resnet8x4,pkt,quick")
    assert quick.batch_size == 16 and math.isclose(quick.distill.feature.weight, 30000.0 / 16)


def test_multi_term_methods_split_into_terms():
    feature = _feature_configs("resnet32x4-mobilenet_small")
    at_terms = methods.feature_terms(feature["at"])
    # CRD's code zips the student's four stage maps with the teacher's three.
    assert [(t["student"], t["teacher"]) for t in at_terms] == [
        (FEATURE_LAYERS["mobilenet_small"][k], FEATURE_LAYERS["resnet32x4"][k])
        for k in ("stage1", "stage2", "stage3")
    ]
    assert {(t["loss"], t["weight"], t["loss_kwargs"]["p"]) for t in at_terms} == {
        ("attention", 1000.0, 2.0)
    }
    rkd_terms = methods.feature_terms(feature["rkd"])
    b = 64
    assert [(t["loss"], t["student"], t["teacher"]) for t in rkd_terms] == [
        ("rkd_distance", "pooled", "pooled"),
        ("rkd_angle", "pooled", "pooled"),
    ]
    # Reference weights 25 and 50 over all B^2 (B^3) entries, jaxkd's over distinct ones.
    np.testing.assert_allclose(
        [t["weight"] for t in rkd_terms], [25 * (b - 1) / b, 50 * (b - 1) * (b - 2) / b**2]
    )
    assert all(t["loss_kwargs"] == {} for t in rkd_terms)
    single = methods.feature_terms(feature["sp"])
    assert len(single) == 1 and single[0]["weight"] == 3000.0
    assert (
        methods.feature_terms(cifar100_pairs.get_config("resnet56-resnet20,kd").distill.feature)
        == []
    )


def test_malformed_feature_fields_and_arguments_raise():
    feature = _feature_configs("resnet56-resnet20")["rkd"]
    feature.student = "pooled"
    with pytest.raises(ValueError, match="distill.feature.student has 1 entries for 2 losses"):
        methods.feature_terms(feature)
    feature = _feature_configs("resnet56-resnet20")["rkd"]
    feature.loss_kwargs.term_weights = (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="term_weights has 3 entries for 2 terms"):
        methods.feature_terms(feature)
    for arg, match in [
        (None, "expected 'PAIR,METHOD'"),
        ("resnet32x4-resnet8x4", "expected 'PAIR,METHOD'"),
        ("resnet32x4-resnet8x4,kd,fast", "expected 'PAIR,METHOD'"),
        ("resnet110-resnet32,kd", "Unknown pair 'resnet110-resnet32'"),
        ("resnet32x4-resnet8x4,vid", "Unknown method 'vid'"),
    ]:
        with pytest.raises(ValueError, match=match):
            cifar100_pairs.get_config(arg)


# Feature paths ----------------------------------------------------------------


def _abstract_variables(model, batch=BATCH):
    sample = jax.ShapeDtypeStruct((batch, *IMAGE), jnp.float32)
    return jax.eval_shape(lambda x: models.init_model(model, jax.random.key(0), x), sample)


@pytest.fixture(scope="module")
def feature_shapes():
    """``{model: {feature name: shape}}`` of every FEATURE_LAYERS path, from the runner's
    capture (``jaxkd.linen_apply(..., features=...)``), traced only."""
    shapes = {}
    for name, layers in FEATURE_LAYERS.items():
        model = models.get_model(name, 100)
        params, state = _abstract_variables(model)
        apply = jaxkd.linen_apply(model, features=layers)
        outputs, _ = jax.eval_shape(
            lambda p, s, x, apply=apply: apply(p, s, x, train=False),
            params,
            state,
            jax.ShapeDtypeStruct((BATCH, *IMAGE), jnp.float32),
        )
        shapes[name] = {key: value.shape for key, value in outputs["features"].items()}
        # Each stage path is the stage's last block: the next index does not exist.
        for key, path in layers.items():
            if key.startswith("stage"):
                stage, block = path.split("_block")
                assert path in params and f"{stage}_block{int(block) + 1}" not in params, path
    return shapes


def test_feature_paths_are_each_stages_last_map_and_the_pooled_embedding(feature_shapes):
    assert set(FEATURE_LAYERS) == {
        name for pair in PAIRS.values() for name in (pair.teacher, pair.student)
    }
    for shapes in feature_shapes.values():
        stages = [key for key in shapes if key.startswith("stage")]
        assert stages == [f"stage{k}" for k in range(1, len(stages) + 1)]
        # Stage k halves the resolution of stage k - 1, from 32x32; CRD's feat[1:-1].
        assert [shapes[key][1:3] for key in stages] == [
            (32 >> k, 32 >> k) for k in range(len(stages))
        ]
        assert all(len(shapes[key]) == 4 and shapes[key][0] == BATCH for key in stages)
        assert len(shapes["pooled"]) == 2 and shapes["pooled"][0] == BATCH
    assert feature_shapes["resnet32x4"]["stage3"] == (BATCH, 8, 8, 256)
    assert feature_shapes["wrn_40_2"]["stage1"] == (BATCH, 32, 32, 32)
    assert feature_shapes["wrn_16_2"]["pooled"] == (BATCH, 128)
    assert feature_shapes["mobilenet_small"]["pooled"] == (BATCH, 1280)


@pytest.mark.parametrize("pair_name", PAIRS)
def test_feature_terms_fit_the_models(feature_shapes, pair_name):
    pair = PAIRS[pair_name]
    by_path = {
        role: {FEATURE_LAYERS[model][k]: shape for k, shape in feature_shapes[model].items()}
        for role, model in (("student", pair.student), ("teacher", pair.teacher))
    }
    for method, feature in _feature_configs(pair_name).items():
        for term in methods.feature_terms(feature):
            student, teacher = (
                by_path["student"][term["student"]],
                by_path["teacher"][term["teacher"]],
            )
            if term["loss"] in ("hint", "attention"):  # maps of the same size
                assert student[:3] == teacher[:3], (method, term)
            if term["loss"] == "hint" and student != teacher:
                assert term["projector"] == "linear"
            if term["loss"] in ("rkd_distance", "rkd_angle", "pkt", "crd"):
                assert len(student) == len(teacher) == 2, (method, term)


# One step ---------------------------------------------------------------------


def _simple_init(model, seed):
    """Params and BatchNorm statistics of ``model``'s shapes without compiling its
    initializer: kernels N(0, 1/fan_in), scales 1, biases 0, running mean 0, var 1."""
    params, state = _abstract_variables(model)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "var"):
            return np.ones(leaf.shape, np.float32)
        if name in ("bias", "mean"):
            return np.zeros(leaf.shape, np.float32)
        fan_in = math.prod(leaf.shape[:-1])
        return (rng.standard_normal(leaf.shape) / math.sqrt(fan_in)).astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, (params, state))


def _student_step(config, teacher_model, student_model, num_train):
    """The runner's distilled objective and train step (single device), with the
    ``distill.feature`` paths captured as the runner does."""
    objective = methods.distillation_objective(config, num_train)
    student_features, teacher_features = methods.feature_paths(config)
    student_apply = jaxkd.linen_apply(student_model, features=student_features or None)
    teacher_apply = jaxkd.linen_teacher_apply(teacher_model, features=teacher_features or None)
    optimizer = train.make_optimizer(config, steps=config.steps, learning_rate=config.learning_rate)
    step = jaxkd.make_train_step(student_apply, teacher_apply, objective, optimizer)
    return objective, student_apply, teacher_apply, optimizer, step


def test_wrn_pair_teacher_and_fitnet_student_step_on_mock_data(fast_compile):
    config = cifar100_pairs.get_config("wrn_40_2-wrn_16_2,fitnet,quick")
    with tfds.testing.mock_data(num_examples=BATCH):
        arrays = data.load_split(config.dataset, "train", None)
    batch = {"image": arrays["image"][:BATCH], "label": arrays["label"][:BATCH]}
    teacher_model, student_model = (
        models.get_model(config[role].model, 100) for role in ("teacher", "student")
    )

    teacher_optimizer = train.make_optimizer(
        config, steps=config.teacher.steps, learning_rate=config.teacher.learning_rate
    )
    params, model_state = _simple_init(teacher_model, 0)
    teacher_state = jaxkd.TrainState.create(
        params=params, optimizer=teacher_optimizer, model_state=model_state
    )
    teacher_step = jax.jit(
        jaxkd.make_train_step(
            jaxkd.linen_apply(teacher_model),
            None,
            jaxkd.cross_entropy_objective(),
            teacher_optimizer,
        )
    )
    teacher_state, metrics = teacher_step(teacher_state, None, batch)
    assert np.isfinite(metrics["loss"]) and int(teacher_state.step) == 1
    assert not np.allclose(teacher_state.params["head"]["kernel"], params["head"]["kernel"])

    objective, student_apply, teacher_apply, optimizer, step = _student_step(
        config, teacher_model, student_model, len(arrays["label"])
    )
    params, model_state = _simple_init(student_model, 1)
    teacher_variables = {"params": teacher_state.params, **teacher_state.model_state}
    student_out, teacher_out = jax.eval_shape(
        lambda: (
            student_apply(params, model_state, batch["image"], train=False)[0],
            teacher_apply(teacher_variables, batch["image"]),
        )
    )
    # The FitNet regressor maps the student's stage2 channels to the teacher's.
    assert student_out["features"]["student_0"].shape == (BATCH, 16, 16, 64)
    assert teacher_out["features"]["teacher_0"].shape == (BATCH, 16, 16, 64)
    distill_params, distill_state = jaxkd.init_distillation(
        objective, jax.random.key(2), student_out, teacher_out, batch
    )
    assert distill_params["projector"]["kernel"].shape == (64, 64)
    state = jaxkd.TrainState.create(
        params=params,
        optimizer=optimizer,
        model_state=model_state,
        distill_params=distill_params,
        distill_state=distill_state,
    )
    state, metrics = jax.jit(step)(state, teacher_variables, batch)
    assert int(state.step) == 1
    for key in ("loss", "ce_loss", "feature_loss"):
        assert np.isfinite(metrics[key]), key
    assert metrics["feature_weight"] == 100.0 and metrics["feature_loss"] > 0
    np.testing.assert_allclose(
        metrics["loss"], metrics["ce_loss"] + 100.0 * metrics["feature_loss"], rtol=1e-5
    )
    assert not np.allclose(
        state.distill_params["projector"]["kernel"], distill_params["projector"]["kernel"]
    )


@pytest.mark.parametrize(
    "pair_name, method",
    [
        ("resnet32x4-resnet8x4", "dkd"),
        ("resnet56-resnet20", "pkt"),
        ("resnet32x4-mobilenet_small", "sp"),
    ],
)
def test_distilled_step_of_the_other_pairs_on_mock_data(fast_compile, pair_name, method):
    """One distilled step of each other pair on mock CIFAR-100 (teacher from its
    initializer's shapes: the step's code path, not a trained teacher)."""
    config = cifar100_pairs.get_config(f"{pair_name},{method},quick")
    with tfds.testing.mock_data(num_examples=BATCH):
        arrays = data.load_split(config.dataset, "train", None)
    batch = {"image": arrays["image"][:BATCH], "label": arrays["label"][:BATCH]}
    teacher_model, student_model = (
        models.get_model(config[role].model, 100) for role in ("teacher", "student")
    )
    objective, student_apply, teacher_apply, optimizer, step = _student_step(
        config, teacher_model, student_model, 64
    )
    params, model_state = _simple_init(student_model, 1)
    teacher_params, teacher_state = _simple_init(teacher_model, 0)
    teacher_variables = {"params": teacher_params, **teacher_state}
    state = jaxkd.TrainState.create(params=params, optimizer=optimizer, model_state=model_state)
    new_state, metrics = jax.jit(step)(state, teacher_variables, batch)
    assert int(new_state.step) == 1
    assert np.isfinite(metrics["loss"]) and np.isfinite(metrics["ce_loss"])
    assert ("feature_loss" in metrics) == bool(config.distill.feature.loss)
    assert not np.allclose(jax.tree.leaves(new_state.params)[0], jax.tree.leaves(state.params)[0])


# Anchors ----------------------------------------------------------------------


def test_anchors_table_is_well_formed():
    sources = {
        anchors.CRD_TABLE_1,
        anchors.CRD_TABLE_2,
        anchors.DKD_SAME,
        anchors.DKD_DIFFERENT,
    }
    assert {pair.anchor for pair in PAIRS.values()} <= set(anchors.PUBLISHED)
    for pair, entries in anchors.PUBLISHED.items():
        assert "teacher" in entries and set(entries) <= set(anchors.KEYS), pair
        for key, anchor in entries.items():
            assert 0.0 < anchor.accuracy < 100.0 and anchor.source in sources, (pair, key)
            assert (anchor.source in (anchors.DKD_SAME, anchors.DKD_DIFFERENT)) == (key == "dkd")
        if "student" in entries:
            assert set(entries) == set(anchors.KEYS), pair
            # A transposed number would likely break these orderings, true of every pair.
            assert entries["teacher"].accuracy > entries["student"].accuracy
            assert entries["dkd"].accuracy > entries["kd"].accuracy > entries["student"].accuracy
            assert entries["crd"].accuracy > entries["kd"].accuracy
    assert anchors.published("resnet32x4-resnet8x4", "crd").accuracy == 75.51
    assert anchors.published("resnet32x4-mobilenet_small", "kd") is None
    assert anchors.published("resnet50-mobilenetv2", "dkd").accuracy == 70.35


def _summary(**accuracies):
    return {
        kind: {
            "model": model,
            "accuracy": {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": list(v)},
        }
        for kind, (model, v) in accuracies.items()
    }


def test_published_table_beside_ours():
    config = cifar100_pairs.get_config("resnet32x4-resnet8x4,crd")
    summary = _summary(
        teacher=("resnet32x4", [0.79]),
        scratch=("resnet8x4", [0.72, 0.74]),
        distilled=("resnet8x4", [0.75]),
    )
    table = report.published_table(summary, config)
    assert "| run | model | ours | published (paper) | source |" in table
    assert "| teacher | resnet32x4 | 79.00 | 79.42 | Tian et al. 2020 (CRD), Table 1 |" in table
    assert "| student from scratch | resnet8x4 | 73.00 ± 1.00 | 72.50 |" in table
    assert "| distilled student (crd) | resnet8x4 | 75.00 | 75.51 |" in table
    # The stand-in pair: only its teacher was published.
    config = cifar100_pairs.get_config("resnet32x4-mobilenet_small,kd")
    rows = report.published_table(summary, config).split("\n")[4:]
    assert len(rows) == 1 and rows[0].startswith("| teacher | resnet32x4 | 79.00 | 79.42 |")
    # A config without an anchor: no table.
    from experiments.configs import cifar100

    assert report.published_table(summary, cifar100.get_config()) == ""


@pytest.mark.filterwarnings("ignore:No artists with labels")  # no training curves to plot
def test_write_report_appends_the_published_table(tmp_path):
    config = cifar100_pairs.get_config("wrn_40_2-wrn_16_2,dkd,quick")
    results = [
        {"run": run, "seed": 0, "model": model, "accuracy": accuracy}
        for run, model, accuracy in (
            ("teacher", "wrn_40_2", 0.75),
            ("scratch", "wrn_16_2", 0.73),
            ("distilled", "wrn_16_2", 0.76),
        )
    ]
    text = report.write_report(results, config, str(tmp_path))
    written = (tmp_path / "results.md").read_text()
    row = "| distilled student (dkd) | wrn_16_2 | 76.00 | 76.23 | Zhao et al. 2022 (DKD)"
    assert row in text and row in written
    assert written.index("| test accuracy |") < written.index("published (paper)")
