"""Adaptation methods on a tiny model: what each may change, scoring equivalences, the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from fmforge.adapt.classifier import (
    PATTERNS,
    Encoded,
    ExampleBatches,
    VerbalizerClassifier,
    collate,
    encode,
    label_token_ids,
)
from fmforge.adapt.methods import METHODS, run_method
from fmforge.adapt.options import AdaptOptions
from fmforge.adapt.training import train_classifier
from fmforge.cli import main
from fmforge.data.tasks import load_task

WORDS = ["alpha", "beta", "gamma", "delta", "value", "count", "index", "total", "item"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A random-init tiny Llama saved as a model dir with the in-process tokenizer."""
    from fmforge.model.config import preset_config
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.model.load import save_model_dir
    from fmforge.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(preset_config("tiny", vocab_size=tokenizer.vocab_size))
    out = tmp_path_factory.mktemp("models") / "tiny"
    save_model_dir(model, tokenizer, out)
    return out


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "task.jsonl"
    rows = []
    for i in range(40):
        rows.append({"text": f"def alpha_{i}(beta): return beta + {i}", "label": "alpha"})
        rows.append({"text": f"total = count * {i}  # gamma delta", "label": "total"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def loaded(tiny_model_dir):
    import fmforge

    return fmforge.load(str(tiny_model_dir))


def _train(method, loaded, task, **changes):
    import tempfile

    options = AdaptOptions(max_steps=3, batch_size=4, **changes)
    lm = copy.deepcopy(loaded.model)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    classifier, trainable = METHODS[method].build(lm, task, loaded.tokenizer, options)
    trainable_before = [p.detach().clone() for p in trainable]
    data = encode(loaded.tokenizer, task, task.train, PATTERNS[0])
    with tempfile.TemporaryDirectory() as run_dir:
        train_classifier(classifier, trainable, data, options, 1e-2, run_dir)
    after = lm.state_dict()
    changed = {k for k, v in before.items() if not torch.equal(after[k], v)}
    # What training was meant to change did change: every trainable tensor moved.
    assert trainable and all(not torch.equal(p, b) for p, b in zip(trainable, trainable_before))
    return classifier, changed, after


@pytest.mark.parametrize("method", ["prompt-tuning", "pet", "lora"])
def test_prompt_tuning_pet_and_lora_change_no_base_parameter(method, loaded, task_file):
    task = load_task(str(task_file), examples_per_class=4)
    classifier, changed, _ = _train(method, loaded, task)
    assert changed == set()  # and _train checked that the method's own parameters moved
    if method == "prompt-tuning":
        assert classifier.soft_prompt.embeddings.requires_grad
    if method in ("pet", "lora"):
        lora_b = [p for n, p in classifier.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # moved off its zero init


def test_freeze_changes_only_top_block_norm_and_head(loaded, task_file):
    task = load_task(str(task_file), examples_per_class=4)
    _, changed, _ = _train("freeze", loaded, task, top_blocks=1)
    top = len(loaded.model.model.layers) - 1
    assert changed and all(
        k.startswith(f"model.layers.{top}.") or k == "model.norm.weight" for k in changed
    )
    _, probe_changed, _ = _train("linear-probe", loaded, task)
    assert probe_changed == set()


def test_prefix_cache_scores_equal_full_prompt(loaded, task_file):
    task = load_task(str(task_file))
    tok = loaded.tokenizer
    data = encode(tok, task, task.test[:3], PATTERNS[1])
    prefix = tok.encode("def alpha(beta):\n    return beta\n\n")
    classifier = VerbalizerClassifier(loaded.model, label_token_ids(tok, task))
    batch = collate([prefix + ids for ids in data.ids], data.labels)
    with torch.no_grad():
        full = classifier(batch["input_ids"], batch["lengths"])
        classifier.prefix_ids = prefix
        short = collate(data.ids, data.labels)
        cached = classifier(short["input_ids"], short["lengths"])
    torch.testing.assert_close(cached, full, atol=1e-4, rtol=1e-4)


def test_whole_word_scoring_equals_first_token_scoring_for_one_token_words(loaded, task_file):
    task = load_task(str(task_file))
    tok = loaded.tokenizer
    label_ids = [[100], [101]]  # two one-token label words
    data = encode(tok, task, task.test[:4], PATTERNS[0])
    batch = collate(data.ids, data.labels)
    classifier = VerbalizerClassifier(loaded.model, label_ids)
    assert classifier.first_token_only
    with torch.no_grad():
        fast = classifier(batch["input_ids"], batch["lengths"])
        classifier.first_token_only = False
        slow = classifier(batch["input_ids"], batch["lengths"])
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)


def test_ensemble_and_icl_rows(loaded, task_file):
    task = load_task(str(task_file), examples_per_class=4)
    from fmforge.adapt.classifier import accuracy
    from fmforge.adapt.icl import icl_probs

    row = run_method("ensemble", loaded, task, AdaptOptions(shots=2, patterns=3)).row
    assert len(row["member_accuracies"]) == 3
    # The ensemble is the mean of its members' distributions, recomputed here independently.
    members = [icl_probs(loaded, task, task.test, 2, PATTERNS[i], i, 96, 16)[0] for i in range(3)]
    labels = [task.label_index(e.label) for e in task.test]
    assert row["accuracy"] == pytest.approx(accuracy(torch.stack(members).mean(0), labels))
    assert row["member_accuracies"] == pytest.approx([accuracy(m, labels) for m in members])
    icl = run_method("icl", loaded, task, AdaptOptions(shots=2)).row
    assert icl["shots"] == 2 and icl["trainable_params"] == 0


def test_cli_adapt_eval_and_bad_inputs(tiny_model_dir, task_file, tmp_path, capsys):
    base, task = str(tiny_model_dir), str(task_file)
    small = ["--max-steps", "2", "--batch-size", "4", "--examples-per-class", "4"]
    out = tmp_path / "lora"
    assert main(["adapt", "lora", "--base", base, "--task", task, "--out", str(out), *small]) == 0
    trained = json.loads(capsys.readouterr().out)["accuracy"]
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert main(["eval", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["accuracy"] == pytest.approx(trained, abs=1e-6)

    def fails(argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err

    common = ["--base", base, "--out", str(tmp_path / "x")]
    fails(["adapt", "lorra", *common, "--task", task], "invalid choice")
    # Each method offers only the options it reads (built from the method table).
    fails(["adapt", "majority", *common, "--task", task, "--rank", "4"], "has no option --rank")
    fails(["adapt", "lora", *common, "--task", task, "--top-blocks", "2"], "--top-blocks")
    fails(["adapt", "lora", *common, "--task", "no-such-task"], "unknown task")
    fails(
        ["adapt", "lora", *common, "--task", task, "--examples-per-class", "999"],
        "larger than the train split",
    )
    fails(
        ["adapt", "pet", *common, "--task", task, "--verbalizer", "alpha=a"],
        "absent from the verbalizer",
    )
    other = tmp_path / "other"
    torch.manual_seed(1)
    from fmforge.model.load import load_model_dir, save_model_dir

    different = load_model_dir(tiny_model_dir)
    different.model.reset_parameters()
    save_model_dir(different.model, different.tokenizer, other)
    fails(["eval", str(out), "--base", str(other)], "different base")


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_saves_and_reads_back_its_adapted_dir(
    method, tiny_model_dir, task_file, tmp_path
):
    from fmforge.adapt.adapted import adapt, evaluate

    options = AdaptOptions(max_steps=2, batch_size=4, shots=2, patterns=2)
    out = tmp_path / method
    row = adapt(method, str(tiny_model_dir), str(task_file), out, options, examples_per_class=4)
    meta = json.loads((out / "adapt.json").read_text())
    assert meta["method"] == method and meta["results"]["accuracy"] == row["accuracy"]
    assert (out / "model").is_dir() == METHODS[method].model_in_dir()
    assert (out / "adapter_model.safetensors").is_file() == (
        method in ("lora", "pet", "prompt-tuning")
    )
    # Read back, the adapted dir scores the test split exactly as the run that wrote it.
    assert evaluate(str(out))["accuracy"] == pytest.approx(row["accuracy"], abs=1e-6)


def test_compare_writes_results_report_and_plot(tiny_model_dir, task_file, tmp_path):
    out = tmp_path / "compare"
    argv = [
        "adapt",
        "compare",
        "--base",
        str(tiny_model_dir),
        "--task",
        str(task_file),
        "--out",
        str(out),
        "--examples-per-class",
        "2,4",
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--methods",
        "majority,linear-probe,lora,icl,ensemble",
        "--patterns",
        "2",
    ]
    assert main(argv) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    keys = {
        "method",
        "examples_per_class",
        "accuracy",
        "trainable_params",
        "train_seconds",
        "peak_memory_mb",
    }
    assert all(keys <= set(r) for r in rows)
    assert {r["method"] for r in rows} == {"majority", "linear-probe", "lora", "icl", "ensemble"}
    assert (out / "accuracy_vs_examples.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "| majority |" in report and "standard errors" in report
    steps = {r["method"]: r["steps"] for r in rows if "steps" in r}
    assert steps == {"linear-probe": 2, "lora": 2 * METHODS["lora"].compare_step_scale}
    assert METHODS["lora"].compare_step_scale > 1  # the label-word methods train longer


def test_example_batches_bucket_by_length_and_cover_each_epoch():
    lengths = [1 + (i * 37) % 90 for i in range(64)]
    data = Encoded([[5] * n for n in lengths], [i % 2 for i in range(64)])
    batches = ExampleBatches(data, batch_size=4, seed=3)
    order = batches._epoch_order()
    assert sorted(order.tolist()) == list(range(64))  # a permutation: every example once
    spread = [np.ptp([lengths[i] for i in order[j : j + 4]]) for j in range(0, 64, 4)]
    assert max(spread) < 30  # batches hold similar lengths (random batches span ~80)
    again = ExampleBatches(data, batch_size=4, seed=3)
    assert torch.equal(batches.next_batch()["input_ids"], again.next_batch()["input_ids"])


def test_example_batches_split_a_global_batch_across_ranks():
    data = Encoded([[5] * (1 + i % 7) for i in range(40)], [i % 2 for i in range(40)])
    one = ExampleBatches(data, batch_size=8, seed=1)
    ranks = [ExampleBatches(data, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # across an epoch boundary
        whole = one.next_batch()["labels"].tolist()
        parts = [b.next_batch()["labels"].tolist() for b in ranks]
        assert parts[0] + parts[1] == whole
    assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
