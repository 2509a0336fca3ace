"""The language-model experiment end to end on its ``quick`` config.

Teacher, scratch, token-level KD and on-policy GKD students on the small
standard-library corpus: the report is written, finished runs are reused, a run
resumed from a checkpoint ends where an uninterrupted one did, and a changed
config is refused for exactly the runs that depend on the changed field.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

from experiments import jsonfiles, lm_train
from experiments.configs import lm_stdlib
from experiments.errors import ExperimentError
from experiments.run_config import StaleRunError


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    config = lm_stdlib.get_config("quick")
    config.data_dir = str(tmp_path_factory.mktemp("tfds"))
    workdir = str(tmp_path_factory.mktemp("lm"))
    return config, workdir, lm_train.train_and_evaluate(config, workdir)


def test_quick_run_reports_every_run_per_token(finished):
    config, workdir, results = finished
    assert [r["run"] for r in results] == ["teacher", "scratch", "kd", "gkd"]
    for result in results:
        for key in ("perplexity", "validation_perplexity", "teacher_nll_of_samples"):
            assert math.isfinite(result[key]) and result[key] > 0
        assert math.isclose(result["perplexity"], math.exp(result["cross_entropy"]), rel_tol=1e-9)
        assert result["count"] > 0 and result["tokens_per_s"] > 0
    teacher, *students = results
    assert teacher["params"] > 2 * students[0]["params"]
    assert all(math.isfinite(s["kl"]) and s["kl"] >= 0 for s in students)
    assert "mutual_information" not in teacher  # no teacher to compare with
    for s in students:
        assert s["mutual_information"] >= 0 and 0 <= s["normalized_mutual_information"] <= 1
    with open(os.path.join(workdir, "results.md")) as f:
        text = f.read()
    for title in lm_train.RUN_TITLES.values():
        assert f"| {title} |" in text
    with open(os.path.join(workdir, "results.json")) as f:
        record = json.load(f)  # strict JSON
    assert set(record["summary"]) == set(lm_train.RUNS)
    assert os.path.exists(os.path.join(workdir, "training_curves.png"))


def test_a_resumed_run_ends_where_the_uninterrupted_one_did(finished):
    config, workdir, results = finished
    rundir = os.path.join(workdir, "seed_0", "gkd")
    final = jsonfiles.read(os.path.join(rundir, "result.json"))
    # Back to the mid-run checkpoint, as if killed after it.
    checkpoints = os.path.join(rundir, "checkpoints")
    shutil.rmtree(os.path.join(checkpoints, str(config.steps)))
    os.remove(os.path.join(rundir, "result.json"))
    again = lm_train.train_and_evaluate(config, workdir)
    resumed = again[-1]
    assert resumed["run"] == "gkd"
    for key in ("perplexity", "validation_perplexity", "kl", "teacher_nll_of_samples"):
        assert resumed[key] == final[key], key
    # The other runs were reused, not trained again.
    assert again[:-1] == results[:-1]


def test_a_changed_field_is_refused_for_the_runs_that_depend_on_it(finished):
    config, workdir, _ = finished
    changed = lm_stdlib.get_config("quick")
    changed.data_dir = config.data_dir
    changed.kd.alpha = 0.9
    with pytest.raises(StaleRunError) as error:
        lm_train.train_and_evaluate(changed, workdir)
    message = str(error.value)
    assert "seed_0/kd: kd.alpha: 0.5 -> 0.9" in message
    assert "gkd" not in message and "scratch" not in message


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("prompt_length", 0, "prompt_length=0"),
        ("seq_len", 4, "prompt_length=8 must be in \\[1, seq_len=4\\]"),
        ("tokenizer", "wordpiece", "tokenizer='wordpiece'"),
        ("batch_size", 3, "batch_size=3"),
        ("kd.loss", "nonexistent", "kd: Unknown `loss` 'nonexistent'"),
        ("gkd.lmbda", 1.5, "gkd.lmbda=1.5"),
        ("gkd.alpha", 2.0, "gkd: `alpha` must lie in \\[0, 1\\]"),
        ("student.num_heads", 3, "student.d_model=32 must split into student.num_heads=3"),
    ],
)
def test_a_bad_config_is_refused_before_anything_runs(tmp_path, field, value, message):
    config = lm_stdlib.get_config("quick")
    node, *rest = field.split(".")
    if rest:
        config[node][rest[0]] = value
    else:
        config[field] = value
    with pytest.raises(ExperimentError, match=message):
        lm_train.train_and_evaluate(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
