"""Mutual information of the teacher's and the student's top-1 predictions.

The reference is written from the definition, in float64 numpy:
``I(T; S) = sum_{t,s: p(t,s) > 0} p(t,s) log(p(t,s) / (p(t) p(s)))`` over the
empirical joint of the two argmaxes, ``H`` the Shannon entropy of a marginal, and
``NMI = I / sqrt(H(T) H(S))`` (Strehl and Ghosh, 2002), with the degenerate cases
that jaxkd defines: both labelings constant gives NMI 1, one constant gives 0, an
empty joint gives (0, 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _reference import random_logits

import jaxkd
from experiments import report
from jaxkd.lm._metrics import summarize_token_eval
from jaxkd.train._metrics import (
    mutual_information,
    mutual_information_of_labels,
    prediction_joint_counts,
    prediction_pairs,
)
from jaxkd.train._step import make_eval_step, summarize_eval

C = 5


def reference_joint(teacher_labels, student_labels, num_classes, where=None):
    """Counts ``N[t, s]`` of label pairs, by a Python loop."""
    joint = np.zeros((num_classes, num_classes))
    where = np.ones(np.shape(teacher_labels), bool) if where is None else where
    for t, s, keep in zip(
        np.ravel(teacher_labels), np.ravel(student_labels), np.ravel(where), strict=True
    ):
        joint[t, s] += keep
    return joint


def reference_mi(joint):
    """``(I, NMI)`` of a joint of counts, from the definition, in float64."""
    joint = np.asarray(joint, np.float64)
    p = joint / joint.sum()
    p_t, p_s = p.sum(axis=1), p.sum(axis=0)
    mi = 0.0
    for t in range(p.shape[0]):
        for s in range(p.shape[1]):
            if p[t, s] > 0:
                mi += p[t, s] * np.log(p[t, s] / (p_t[t] * p_s[s]))
    h_t = -sum(q * np.log(q) for q in p_t if q > 0)
    h_s = -sum(q * np.log(q) for q in p_s if q > 0)
    return mi, mi / np.sqrt(h_t * h_s), h_t


def _labels(seed, size, num_classes=C):
    """Dependent random labels: the student copies the teacher 60% of the time."""
    rng = np.random.default_rng(seed)
    teacher = rng.integers(0, num_classes, size)
    student = np.where(rng.random(size) < 0.6, teacher, rng.integers(0, num_classes, size))
    return teacher, student


def _check(pair, expected, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(pair, np.float64), expected, rtol=rtol, atol=atol)


# Functions on arrays.


@pytest.mark.parametrize("shape", [(12, C), (4, 3, C)])
def test_joint_counts_and_mi_match_the_reference(shape):
    student, teacher = random_logits(0, shape), random_logits(1, shape)
    where = random_logits(2, shape[:-1]) > 0
    expected = reference_joint(teacher.argmax(-1), student.argmax(-1), C, where)
    joint = prediction_joint_counts(student, teacher, where=where)
    assert joint.dtype == jnp.float32 and joint.shape == (C, C)
    np.testing.assert_array_equal(joint, expected)
    mi, nmi, _ = reference_mi(expected)
    _check(mutual_information(joint), (mi, nmi))
    _check(jax.jit(mutual_information)(joint), (mi, nmi))
    pairs = prediction_pairs(student, teacher, where=where)
    assert pairs.dtype == jnp.int32 and pairs.shape == (where.size, 2)
    np.testing.assert_array_equal(pairs[~where.ravel()], -1)
    _check(mutual_information_of_labels(pairs[:, 0], pairs[:, 1], where=where.ravel()), (mi, nmi))


def test_mi_of_random_labels_matches_the_reference_on_both_paths():
    teacher, student = _labels(3, 500)
    mi, nmi, _ = reference_mi(reference_joint(teacher, student, C))
    assert mi > 0.1 and 0.1 < nmi < 1  # a case that tests something
    _check(mutual_information(reference_joint(teacher, student, C)), (mi, nmi))
    _check(mutual_information_of_labels(teacher, student), (mi, nmi), rtol=1e-12, atol=0)
    # Integer counts, and a rectangular joint: classes that never occur change nothing.
    counts = reference_joint(teacher, student, C + 2).astype(np.int32)
    _check(mutual_information(counts[:C, :C]), (mi, nmi))
    _check(mutual_information(counts[:C]), (mi, nmi))


def test_independent_by_construction_gives_zero():
    # An outer product of marginals: every row proportional to every other.
    joint = np.outer([1.0, 2.0, 3.0], [4.0, 0.0, 5.0])
    _check(mutual_information(joint), (0.0, 0.0))
    # Every (t, s) combination twice: the labels are independent exactly.
    teacher, student = np.meshgrid(np.arange(3), np.arange(4), indexing="ij")
    teacher, student = np.tile(teacher.ravel(), 2), np.tile(student.ravel(), 2)
    _check(mutual_information_of_labels(teacher, student), (0.0, 0.0), atol=1e-12)


def test_identical_predictions_give_the_entropy_and_nmi_one():
    logits = random_logits(4, (40, C))
    joint = prediction_joint_counts(logits, logits)
    mi, _, entropy = reference_mi(joint)
    assert entropy > 1.0
    _check(mutual_information(joint), (entropy, 1.0))
    labels = logits.argmax(-1)
    _check(mutual_information_of_labels(labels, labels), (entropy, 1.0), rtol=1e-12, atol=0)


def test_permuting_the_students_labels_leaves_mi_unchanged():
    teacher, student = _labels(5, 200)
    permutation = np.array([3, 0, 4, 1, 2])
    joint = reference_joint(teacher, student, C)
    expected = mutual_information(joint)
    _check(mutual_information(joint[:, np.argsort(permutation)]), expected)
    _check(mutual_information(joint[:, permutation]), expected)
    _check(mutual_information_of_labels(teacher, permutation[student]), expected)
    # Not a constant: a non-bijective relabeling (merging two classes) loses information.
    merged = np.where(student == 1, 0, student)
    assert mutual_information_of_labels(teacher, merged)[0] < float(expected[0]) - 0.05


def test_degenerate_joints_are_defined_never_nan():
    cases = {
        "both constant (one to one)": (np.diag([0.0, 7.0, 0.0]), (0.0, 1.0)),
        "teacher constant": (np.array([[3.0, 4.0, 1.0], [0, 0, 0], [0, 0, 0]]), (0.0, 0.0)),
        "student constant": (np.array([[3.0, 0, 0], [4.0, 0, 0], [1.0, 0, 0]]), (0.0, 0.0)),
        "empty": (np.zeros((3, 3)), (0.0, 0.0)),
    }
    for name, (joint, expected) in cases.items():
        _check(mutual_information(joint), expected, atol=0, rtol=0)
        rows, columns = np.nonzero(joint)
        repeats = joint[rows, columns].astype(int)
        teacher, student = np.repeat(rows, repeats), np.repeat(columns, repeats)
        assert mutual_information_of_labels(teacher, student) == expected, name
    # Fully masked logits count nothing.
    logits = random_logits(6, (3, C))
    joint = prediction_joint_counts(logits, logits, where=np.zeros(3, bool))
    assert float(joint.sum()) == 0.0
    _check(mutual_information(joint), (0.0, 0.0), atol=0, rtol=0)


def test_masked_examples_count_zero_as_if_sliced():
    student, teacher = random_logits(7, (4, 3, C)), random_logits(8, (4, 3, C))
    where = np.array([[1, 1, 0], [0, 0, 0], [1, 0, 1], [1, 1, 1]], bool)
    student_masked, teacher_masked = student.copy(), teacher.copy()
    student_masked[~where] = np.nan  # whatever a masked token holds
    np.testing.assert_array_equal(
        prediction_joint_counts(student_masked, teacher_masked, where=where),
        prediction_joint_counts(student[where], teacher[where]),
    )
    # A mask with a class axis of size 1 is the same mask.
    np.testing.assert_array_equal(
        prediction_joint_counts(student, teacher, where=where[..., None]),
        prediction_joint_counts(student[where], teacher[where]),
    )


def test_bad_input_raises_naming_the_argument():
    logits = random_logits(9, (4, C))
    with pytest.raises(ValueError, match="Shapes must match"):
        prediction_joint_counts(logits, random_logits(9, (4, C + 1)))
    with pytest.raises(TypeError, match="student_logits"):
        prediction_joint_counts(np.ones((4, C), np.int32), logits)
    with pytest.raises(ValueError, match="per-class mask"):
        prediction_joint_counts(logits, logits, where=np.ones((4, C), bool))
    with pytest.raises(ValueError, match=r"`where` has shape \(3,\)"):
        prediction_pairs(logits, logits, where=np.ones(3, bool))
    with pytest.raises(ValueError, match=r"\[C_T, C_S\] matrix, got shape \(2, 3, 3\)"):
        mutual_information(np.ones((2, 3, 3)))
    with pytest.raises(ValueError, match="non-negative"):
        mutual_information(np.array([[1.0, -1.0], [0.0, 2.0]]))
    with pytest.raises(TypeError, match="joint_counts"):
        mutual_information(np.ones((2, 2), bool))
    with pytest.raises(TypeError, match="teacher_labels"):
        mutual_information_of_labels(np.ones(3), np.ones(3, int))
    with pytest.raises(ValueError, match="student_labels"):
        mutual_information_of_labels(np.ones(3, int), np.ones(4, int))
    with pytest.raises(ValueError, match="where"):
        mutual_information_of_labels(np.ones(3, int), np.ones(3, int), where=np.ones(3, int))
    with pytest.raises(ValueError, match="prediction_joint"):
        make_eval_step(_student_apply, _teacher_apply, prediction_joint="sparse")
    with pytest.raises(ValueError, match=r"prediction_joint.*\(8, 5, 5\)"):
        summarize_eval({"count": np.float32(1), "prediction_joint": np.ones((8, C, C))})


# The eval step: one device and 8 devices with an uneven mask.

NUM_DEVICES, GLOBAL_BATCH, WIDTH, LENGTH = 8, 32, 6, 3
# 6 real examples: 4 on device 0, 1 on device 4, 1 on device 7; the others hold none.
UNEVEN_MASK = np.isin(np.arange(GLOBAL_BATCH), [0, 1, 2, 3, 17, 30])


def _student_apply(params, model_state, x, *, train, rng):
    del train, rng
    return jnp.einsum("...d,dc->...c", x, params["w"]), model_state


def _teacher_apply(params, x):
    return jnp.einsum("...d,dc->...c", x, params["w"])


def _setup(num_classes, tokens, seed=0):
    """A linear student close to a linear teacher, a state and a masked batch."""
    rng = np.random.default_rng(seed)
    teacher_w = rng.normal(size=(WIDTH, num_classes)).astype(np.float32)
    student_w = teacher_w + 0.8 * rng.normal(size=teacher_w.shape).astype(np.float32)
    state = jaxkd.TrainState.create(params={"w": student_w}, optimizer=optax.sgd(0.1))
    shape = (GLOBAL_BATCH, LENGTH) if tokens else (GLOBAL_BATCH,)
    mask = UNEVEN_MASK[:, None] & (rng.random(shape) < 0.7) if tokens else UNEVEN_MASK
    batch = {
        "image": rng.normal(size=(*shape, WIDTH)).astype(np.float32),
        "label": rng.integers(0, num_classes, shape).astype(np.int32),
        "mask": mask,
    }
    return state, {"w": teacher_w}, batch


def _expected(state, teacher, batch):
    student = np.asarray(_student_apply(state.params, {}, batch["image"], train=False, rng=None)[0])
    teacher_logits = np.asarray(_teacher_apply(teacher, batch["image"]))
    where = batch["mask"]
    joint = reference_joint(teacher_logits.argmax(-1), student.argmax(-1), C, where)
    mi, nmi, _ = reference_mi(joint)
    return joint, mi, nmi


@pytest.mark.parametrize("tokens, mode", [(False, "auto"), (True, "labels")])
def test_eval_step_mi_is_the_same_on_one_and_eight_devices(tokens, mode):
    assert jax.device_count() == NUM_DEVICES
    state, teacher, batch = _setup(C, tokens)
    joint, mi, nmi = _expected(state, teacher, batch)
    assert mi > 0.05
    one = jax.jit(make_eval_step(_student_apply, _teacher_apply, prediction_joint=mode))
    sums = one(state, teacher, batch)
    mesh = jaxkd.data_mesh()
    eight = jaxkd.shard_step(
        make_eval_step(_student_apply, _teacher_apply, axis_name="data", prediction_joint=mode),
        mesh,
        donate=False,
    )
    sharded = jax.device_get(
        eight(jaxkd.replicate_on_mesh(state, mesh), teacher, jaxkd.shard_batch(batch, mesh))
    )
    if mode == "labels":  # the pairs of every example, in the global batch's order
        assert "prediction_joint" not in sums
        assert sums["prediction_pairs"].shape == (batch["mask"].size, 2)
        np.testing.assert_array_equal(sharded["prediction_pairs"], sums["prediction_pairs"])
    else:
        np.testing.assert_array_equal(sums["prediction_joint"], joint)
        np.testing.assert_array_equal(sharded["prediction_joint"], joint)
    summarize = summarize_token_eval if tokens else summarize_eval
    for summary in (summarize(sums), summarize(sharded)):
        assert summary["count"] == batch["mask"].sum()
        np.testing.assert_allclose(summary["mutual_information"], mi, rtol=1e-5)
        np.testing.assert_allclose(summary["normalized_mutual_information"], nmi, rtol=1e-5)


def test_eval_step_keeps_the_dense_joint_only_for_small_class_counts():
    def keys(num_classes, teacher=True, **kwargs):
        state, teacher_params, batch = _setup(num_classes, tokens=False)
        evaluate = make_eval_step(_student_apply, _teacher_apply if teacher else None, **kwargs)
        return set(jax.eval_shape(evaluate, state, teacher_params, batch))

    assert "prediction_joint" in keys(1024)
    assert not {"prediction_joint", "prediction_pairs"} & keys(1025)
    assert "prediction_joint" in keys(1025, prediction_joint="dense")
    assert "prediction_pairs" in keys(1025, prediction_joint="labels")
    assert not {"prediction_joint", "prediction_pairs"} & keys(C, prediction_joint=None)
    assert not {"prediction_joint", "prediction_pairs"} & keys(C, teacher=False)


# The results table.


def _fake_results(kind="distilled"):
    teacher = {"run": "teacher", "model": "big", "seed": 0, "accuracy": 0.9}
    students = [
        {
            "run": kind,
            "model": "small",
            "seed": seed,
            "agreement": 0.85,
            "mutual_information": mi,
            "normalized_mutual_information": nmi,
        }
        for seed, mi, nmi in ((0, 1.25, 0.75), (1, 1.75, 0.85))
    ]
    return [teacher, *students]


def _table_cells(table, column_titles):
    header, _, *rows = table.splitlines()
    titles = [cell.strip() for cell in header.strip("|").split("|")]
    cells = [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]
    return {row[0]: {t: row[titles.index(t)] for t in column_titles} for row in cells}


def test_classification_report_has_the_mi_columns_na_for_the_teacher():
    titles = ("MI(teacher; student) (nats)", "normalized MI")
    table = report.markdown_table(report.summarize(_fake_results()))
    cells = _table_cells(table, titles)
    assert cells["teacher"] == dict.fromkeys(titles, "n/a")
    assert cells["distilled student"] == {
        titles[0]: "1.5000 ± 0.2500",
        titles[1]: "0.8000 ± 0.0500",
    }


def test_lm_report_has_the_mi_columns():
    from experiments import lm_train  # its own table's columns

    titles = ("MI(teacher; student) (nats)", "normalized MI")
    run_titles = lm_train.run_titles({"teacher", "kd"})
    columns = lm_train.COLUMNS
    summary = report.summarize(_fake_results("kd"), columns=columns, run_titles=run_titles)
    cells = _table_cells(
        report.markdown_table(summary, columns=columns, run_titles=run_titles), titles
    )
    assert cells["teacher"] == dict.fromkeys(titles, "n/a")
    assert cells[run_titles["kd"]] == {titles[0]: "1.5000 ± 0.2500", titles[1]: "0.8000 ± 0.0500"}
