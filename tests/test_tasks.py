"""Tasks: seeded splits, examples-per-class subsets, verbalizers, user jsonl, missing data."""

from __future__ import annotations

import json

import pytest

from fmforge.data import tasks
from fmforge.data.tasks import load_task, parse_verbalizer
from fmforge.errors import UserError


@pytest.fixture
def user_task(tmp_path):
    path = tmp_path / "task.jsonl"
    rows = [{"text": f"good movie number {i}", "label": "pos"} for i in range(30)]
    rows += [{"text": f"bad film number {i}", "label": "neg"} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_user_jsonl_splits_are_disjoint_seeded_and_per_class(user_task):
    a = load_task(str(user_task), seed=0)
    b = load_task(str(user_task), seed=0)
    assert a.labels == ["neg", "pos"]
    assert [e.text for e in a.test] == [e.text for e in b.test]
    texts = [set(e.text for e in split) for split in (a.train, a.validation, a.test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert {e.label for e in a.test} == {"neg", "pos"}
    k = load_task(str(user_task), examples_per_class=4)
    assert sorted(e.label for e in k.train) == ["neg"] * 4 + ["pos"] * 4
    assert set(e.text for e in k.train) <= texts[0]  # a subset of the full train split


def test_examples_per_class_larger_than_split_is_a_user_error(user_task):
    with pytest.raises(UserError, match="larger than the train split"):
        load_task(str(user_task), examples_per_class=1000)


def test_verbalizer_must_cover_every_label(user_task):
    task = load_task(str(user_task), verbalizer={"pos": "great", "neg": "awful"})
    assert task.verbalizer == {"pos": "great", "neg": "awful"}
    with pytest.raises(UserError, match="absent from the verbalizer"):
        load_task(str(user_task), verbalizer={"pos": "great"})
    assert parse_verbalizer("pos=great, neg=awful") == {"pos": "great", "neg": "awful"}
    with pytest.raises(UserError):
        parse_verbalizer("pos")


def test_unknown_task_suggests(tmp_path):
    with pytest.raises(UserError, match="did you mean 'fortunes-topic'"):
        load_task("fortune-topic")


def test_missing_data_package_names_the_install(monkeypatch, tmp_path):
    monkeypatch.setattr(tasks, "FORTUNES_DIR", tmp_path / "absent")
    with pytest.raises(UserError, match="apt-get install fortunes"):
        load_task("fortunes-topic")


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_shipped_tasks_have_every_label_in_every_split(name):
    try:
        task = load_task(name)
    except UserError as e:
        pytest.skip(str(e))
    for split in (task.train, task.validation, task.test):
        assert {e.label for e in split} == set(task.labels)
    assert set(task.verbalizer) == set(task.labels)
