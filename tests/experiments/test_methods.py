"""The runner's distillation methods by config: a feature term (hints through a
trained projector) beside the logit term, and a dynamic run beside the fixed one."""

from __future__ import annotations

import inspect

import jax
import pytest

from experiments import methods, train
from experiments.configs import digits
from experiments.errors import ExperimentError

STEPS = dict(steps=4, eval_every=4, log_every=2, checkpoint_every=4)


def _config(data_dir, **fields):
    config = digits.get_config("quick")
    config.data_dir = data_dir
    config.teacher.steps = 4
    for name, value in {**STEPS, **fields}.items():
        node = config
        *parents, leaf = name.split("__")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


HINTS = dict(
    distill__feature__loss="hint",
    distill__feature__student="hidden_0",
    distill__feature__teacher="hidden_1",
    distill__feature__weight=0.5,
    distill__feature__projector="linear",
)


@pytest.fixture(scope="module")
def hinted(tmp_path_factory):
    data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = tmp_path_factory.mktemp("hinted")
    config = _config(
        data_dir,
        student_runs=("distilled", "distilled_dynamic"),
        distill__dynamic__method="gap_alpha",
        **HINTS,
    )
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        results = train.train_and_evaluate(config, str(workdir))
    finally:
        jax.config.update("jax_disable_most_optimizations", False)
    return data_dir, config, workdir, results


def test_hints_and_a_dynamic_run_train_and_report(hinted):
    _, config, workdir, results = hinted
    by_run = {r["run"]: r for r in results}
    assert list(by_run) == ["teacher", "distilled", "distilled_dynamic"]
    # The exported student is the student alone: the projector is not counted.
    assert by_run["distilled"]["params"] == by_run["distilled_dynamic"]["params"]
    text = (workdir / "results.md").read_text()
    assert "+ 0.5 x hint (hidden_0 -> hidden_1, projector linear)" in text
    assert "dynamic student: gap_alpha" in text
    assert "| distilled student, dynamic |" in text
    metrics = [
        line for line in (workdir / "seed_0/distilled/metrics.jsonl").read_text().splitlines()
    ]
    assert any('"feature_loss"' in line for line in metrics)
    assert any(
        '"gap"' in line
        for line in (workdir / "seed_0/distilled_dynamic/metrics.jsonl").read_text().splitlines()
    )


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(distill__feature__loss="fitnet"), "distill.feature.loss='fitnet'"),
        (dict(distill__feature__loss="hint"), "needs the feature paths"),
        ({**HINTS, "distill__feature__projector": "mlp"}, "distill.feature.projector='mlp'"),
        (dict(distill__dynamic__method="ctkd"), "distilled_dynamic run needs a method"),
        (
            dict(student_runs=("distilled", "distilled_dynamic"), distill__dynamic__method="cool"),
            "distill.dynamic.method='cool'",
        ),
        (
            {**HINTS, "student_runs": ("distilled", "distilled_cached")},
            "not with distilled_cached",
        ),
        ({**HINTS, "distill__feature__weight": 0.0}, "a feature term needs a positive weight"),
        (
            {**HINTS, "distill__feature__loss_kwargs": {"p": 2}},
            r"loss_kwargs \['p'\] are options of none of the terms \['hint'\]",
        ),
        (
            {**HINTS, "distill__feature__loss": "hint, crd"},
            "distill.feature.student has 1 entries for 2 losses",
        ),
    ],
)
def test_bad_method_configs_stop_before_training(tmp_path, hinted, fields, match):
    config = _config(hinted[0], **fields)
    with pytest.raises(ExperimentError, match=match):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_changed_feature_weight_makes_the_distilled_run_stale(tmp_path, hinted):
    import shutil

    data_dir, config, workdir, _ = hinted
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    changed = _config(
        data_dir,
        student_runs=("distilled", "distilled_dynamic"),
        distill__dynamic__method="gap_alpha",
        **{**HINTS, "distill__feature__weight": 2.0},
    )
    with pytest.raises(ExperimentError, match=r"distill.feature: .*'weight': 0.5.*'weight': 2.0"):
        train.train_and_evaluate(changed, str(copy))


@pytest.mark.parametrize("method", ["ctkd", "confidence_temperature", "gap_alpha"])
def test_mnist1d_dynamic_configs_validate_and_build_their_objective(method):
    from experiments.configs import mnist1d_dynamic

    config = mnist1d_dynamic.get_config(f"{method},quick")
    train.validate(config, jax.device_count())
    objective = methods.dynamic_objective(config)
    assert callable(objective)
    with pytest.raises(ValueError, match="Unknown method 'fixed'"):
        mnist1d_dynamic.get_config("fixed")


def test_feature_options_go_to_the_terms_that_take_them_and_crd_wraps_the_rest():
    config = _config(
        None,
        distill__feature__loss="crd, attention",
        distill__feature__student="hidden_0,hidden_0",
        distill__feature__teacher="hidden_1,hidden_1",
        distill__feature__loss_kwargs={"num_negatives": 16, "p": 1, "term_weights": (1.0, 2.0)},
    )
    terms = methods.feature_terms(config.distill.feature)
    assert [(t["loss"], t["weight"], t["loss_kwargs"]) for t in terms] == [
        ("crd", 1.0, {"num_negatives": 16}),
        ("attention", 2.0, {"p": 1}),
    ]
    assert methods.uses_crd(config)
    objective = methods.distillation_objective(config, num_train=100)
    # The outermost objective is CRD's: it owns the memory banks.
    assert "distill_state" in inspect.signature(objective).parameters


def test_a_feature_path_the_model_lacks_stops_before_training(tmp_path, hinted):
    config = _config(hinted[0], **{**HINTS, "distill__feature__student": "hidden_7"})
    with pytest.raises(ExperimentError, match=r"distill.feature.student:.*'hidden_7'.*'hidden_0'"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "seed_0").exists()
