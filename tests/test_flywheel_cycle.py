"""`fmforge flywheel cycle|ls|lineage|promote|rollback` on a tiny model: a gated candidate with
its lineage, the adapter loading in PEFT and the merged model in transformers, the gate's rules,
bad input as one-line errors with nothing written, and (slow) SIGKILL at every stage then a
re-run ending with the same registry entry as an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_support import assert_one_line_error, cli
from fmforge.flywheel.cycle import CycleConfig, gate, run_cycle
from fmforge.flywheel.registry import Registry, load_version
from fmforge.flywheel.store import FeedbackStore
from polling import wait_until
from test_serve_support import serve_model_dir  # noqa: F401

TINY = dict(
    sft_steps=4,
    dpo_steps=4,
    batch_size=4,
    seq_len=64,
    rank=2,
    alpha=4.0,
    guard_tokens=256,
    threads=1,
    margin=-1.0,  # promote whatever the tiny model does, unless a guard fails
    guard_tolerance=10.0,
)
TINY_ARGS = [f"--{k}={v}" for k, v in TINY.items()]


def _feedback(db: str, start: int = 0, n: int = 24) -> None:
    store = FeedbackStore(db)
    for i in range(start, start + n):
        gen_id = f"chatcmpl-{i}"
        store.record_generation(
            {
                "id": gen_id,
                "endpoint": "chat",
                "model": "tiny",
                "model_version": "v0",
                "params": {},
                "messages": [{"role": "user", "content": f"def f_{i}(x): return"}],
                "prompt": None,
                "outputs": [f"x + {i}", f"x - {i} # mail me@example.com"],
                "finish_reasons": ["stop", "stop"],
                "prompt_tokens": 5,
                "completion_tokens": 3,
                "latency_s": 0.1,
            }
        )
        store.add_feedback(gen_id, "pairwise", {"chosen": 0, "rejected": 1})
        if i % 3 == 0:
            store.add_feedback(gen_id, "thumbs", "up")
        if i % 4 == 1:
            store.add_feedback(gen_id, "edit", f"x + {i}  # fixed", choice_index=1)
    store.close()


def test_cycle_registers_a_candidate_with_lineage_that_loads_in_peft(
    tmp_path,
    db_url,  # noqa: F811
    serve_model_dir,  # noqa: F811
    capsys,
):
    db = db_url  # SQLite, and PostgreSQL when FMFORGE_TEST_POSTGRES_URL reaches one
    _feedback(db)
    code, out, err = cli(
        capsys, "flywheel", "cycle", "--db", db, "--serving", serve_model_dir,
        "--out", tmp_path / "c1", *TINY_ARGS,
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)
    assert result["version"] == "v1" and result["decision"] == "promote"
    registry = Registry(db)
    v0, v1 = registry.list()
    assert (v0.kind, v0.path, v1.parent, v1.kind) == ("base", str(serve_model_dir), "v0", "lora")
    assert registry.serving().id == "v1" and v1.status == "promoted"
    manifest = json.loads((tmp_path / "c1" / "dataset" / "manifest.json").read_text())
    assert v1.dataset_id == manifest["dataset_id"] and v1.dataset_id.startswith("sha256:")
    assert v1.feedback_counts == {"edit": 6, "pairwise": 24, "thumbs": 8}
    assert v1.log_window["to"] > v1.log_window["from"] == 0.0
    assert manifest["pii_placeholders"]["<EMAIL>"] > 0
    for side in ("incumbent", "candidate"):
        metrics = {"pair_accuracy", "eval_nll", "guard_perplexity", "guard_task_accuracy"}
        assert metrics <= set(v1.eval_report[side])
    assert v1.gate["decision"] == "promote" and v1.gate["metrics"]["metric"] == "pair_accuracy"
    assert v1.config == dataclasses.asdict(CycleConfig(**TINY))
    # The adapter moved the model, loads in PEFT over the transformers base, and equals the
    # merged posttrain output loaded by transformers.
    import transformers
    from peft import PeftModel

    ids = torch.tensor([[3, 17, 42, 9, 100, 7]])
    with torch.no_grad():
        ours = load_version(v1).model(ids)
        base = load_version(v0).model(ids)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(serve_model_dir)
        peft_logits = PeftModel.from_pretrained(hf_base, v1.path)(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "c1/dpo/final")
        merged_logits = merged(ids).logits
    assert not torch.allclose(ours, base, atol=1e-4)
    assert torch.allclose(peft_logits, ours, atol=1e-4)
    assert torch.allclose(merged_logits, ours, atol=1e-4)
    # lineage and ls show where it came from.
    code, out, err = cli(capsys, "flywheel", "lineage", "v1", "--db", db)
    assert code == 0, err
    for needle in ("parent:          v0", v1.dataset_id, "log window", "edit=6, pairwise=24",
                   "gate:            promote by gate", "eval candidate:", "eval incumbent:",
                   "sft_steps=4", "promote by gate"):  # fmt: skip
        assert needle in out, out
    code, out, err = cli(capsys, "flywheel", "ls", "--db", db)
    assert code == 0 and "* v1" in out and "  v0" in out, out
    # A re-run of the finished cycle changes nothing; a new cycle has nothing new to learn.
    assert run_cycle(db, None, tmp_path / "c1", CycleConfig(**TINY)) == result
    code, out, err = cli(capsys, "flywheel", "cycle", "--db", db, "--out", tmp_path / "c2",
                         *TINY_ARGS)  # fmt: skip
    assert code == 0 and "nothing to learn from yet" in out and not (tmp_path / "c2").exists()
    # Manual promotion and rollback append serving events.
    code, out, err = cli(capsys, "flywheel", "rollback", "--db", db, "--by", "ops")
    assert code == 0 and "v0 serves again (rolled back from v1 by ops)" in out
    code, out, err = cli(capsys, "flywheel", "promote", "v1", "--db", db)
    assert code == 0 and registry.serving().id == "v1"
    assert [e["action"] for e in registry.history()] == [
        "promote",
        "promote",
        "rollback",
        "promote",
    ]
    registry.close()


def _report(inc: dict, cand: dict) -> dict:
    return {"incumbent": inc, "candidate": cand}


def test_the_gate_promotes_only_a_better_candidate_whose_guards_hold():
    config = CycleConfig(margin=0.05, guard_tolerance=0.1)
    inc = {"pairs": 20, "pair_accuracy": 0.5, "eval_nll": 2.0, "guard_perplexity": 10.0}
    better = {**inc, "pair_accuracy": 0.7, "guard_perplexity": 10.5}
    decision = gate(_report(inc, better), config)
    assert decision["decision"] == "promote" and decision["metrics"]["delta"] == 0.2
    assert decision["metrics"]["guards"]["guard_perplexity"]["ok"]
    slightly = {**inc, "pair_accuracy": 0.54}
    decision = gate(_report(inc, slightly), config)
    assert decision["decision"] == "reject" and "not more than 0.05" in decision["reason"]
    broken = {**better, "guard_perplexity": 400.0}
    decision = gate(_report(inc, broken), config)
    assert decision["decision"] == "reject" and "guard perplexity x40" in decision["reason"]
    assert not decision["metrics"]["guards"]["guard_perplexity"]["ok"]
    # No held-out pairs: the held-out answers' NLL decides (lower is better).
    no_pairs = {"pairs": 0, "eval_nll": 2.0, "guard_perplexity": 10.0}
    decision = gate(_report(no_pairs, {**no_pairs, "eval_nll": 1.5}), config)
    assert decision["decision"] == "promote" and decision["metrics"]["metric"] == "eval_nll"
    decision = gate(_report({"pairs": 0}, {"pairs": 0}), config)
    assert decision["decision"] == "reject" and "no held-out feedback" in decision["reason"]
    # The shipped-task guard: zero-shot accuracy may fall by at most task_tolerance.
    inc_task = {**inc, "guard_task_accuracy": 0.40}
    within = {**better, "guard_task_accuracy": 0.36}
    decision = gate(_report(inc_task, within), config)
    assert decision["decision"] == "promote"
    assert decision["metrics"]["guards"]["guard_task_accuracy"]["drop"] == 0.04
    forgot = {**better, "guard_task_accuracy": 0.30}
    decision = gate(_report(inc_task, forgot), config)
    assert (
        decision["decision"] == "reject"
        and "zero-shot accuracy fell by 0.100" in decision["reason"]
    )
    assert not decision["metrics"]["guards"]["guard_task_accuracy"]["ok"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, serve_model_dir, capsys):  # noqa: F811
    db = str(tmp_path / "fb.db")
    code, out, err = cli(capsys, "flywheel", "cycle", "--db", db, "--serving", serve_model_dir,
                         "--out", tmp_path / "c")  # fmt: skip
    assert code == 0 and "nothing to learn from yet: no feedback" in out, out + err
    assert not (tmp_path / "c").exists() and Registry(db).list() == []  # no v0 either
    code, out, err = cli(capsys, "flywheel", "promote", "v3", "--db", db)
    assert_one_line_error(code, err, "'v3' is not in the registry")
    code, out, err = cli(capsys, "flywheel", "lineage", "v3", "--db", db)
    assert_one_line_error(code, err, "'v3' is not in the registry")
    code, out, err = cli(capsys, "flywheel", "rollback", "--db", db)
    assert_one_line_error(code, err, "no earlier version to roll back to")
    code, out, err = cli(capsys, "flywheel", "cycle", "--db", db, "--out", tmp_path / "c",
                         "--metric", "vibes")  # fmt: skip
    assert_one_line_error(code, err, "--metric 'vibes' is not one of")
    _feedback(db, n=3)
    code, out, err = cli(capsys, "flywheel", "cycle", "--db", db, "--out", tmp_path / "c")
    assert_one_line_error(code, err, "the registry is empty: pass --serving MODEL")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    code, out, err = cli(capsys, "flywheel", "cycle", "--db", db, "--serving", serve_model_dir,
                         "--out", tmp_path / "busy")  # fmt: skip
    assert_one_line_error(code, err, "is not empty and holds no cycle")
    from sqlalchemy import update

    from fmforge.flywheel.registry import registry_schema

    registry = Registry(db)
    with registry.engine.begin() as conn:
        conn.execute(update(registry_schema).values(version=2))
    registry.close()
    code, out, err = cli(capsys, "flywheel", "ls", "--db", db)
    assert_one_line_error(code, err, "schema version 2, newer than this fmforge understands (1)")
    code, out, err = cli(capsys, "flywheel", "cycle", "--db", db, "--serving", serve_model_dir,
                         "--out", tmp_path / "c3", *TINY_ARGS)  # fmt: skip
    assert_one_line_error(code, err, "schema version 2")
    assert not (tmp_path / "c3").exists()


# Where a run is killed: after each stage's marker appears (and inside both training runs).
KILL_POINTS = [
    "plan.json",
    "dataset/manifest.json",
    "sft/checkpoints/step-2",
    "sft/summary.json",
    "dpo/checkpoints/step-2",
    "dpo/summary.json",
    "candidate/adapter/adapter_config.json",
    "eval.json",
    "gate.json",
]


def _comparable(version, out: Path) -> dict:
    fields = dataclasses.asdict(version)
    fields.pop("created")
    fields["path"] = fields["path"].replace(str(out), "OUT")
    return fields


@pytest.mark.slow
def test_sigkill_at_every_stage_then_rerun_gives_the_same_registry_entry(
    tmp_path,
    serve_model_dir,  # noqa: F811
):
    db_a, db_b = tmp_path / "a.db", tmp_path / "b.db"
    _feedback(str(db_a))
    shutil.copy(db_a, db_b)  # the same logs, feedback timestamps included
    config = CycleConfig(**{**TINY, "sft_steps": 6, "dpo_steps": 6})
    run_cycle(str(db_a), str(serve_model_dir), tmp_path / "a", config)
    args = [sys.executable, "-m", "fmforge.cli", "flywheel", "cycle", "--db", str(db_b),
            "--serving", str(serve_model_dir), "--out", str(tmp_path / "b")]  # fmt: skip
    args += [f"--{k}={v}" for k, v in dataclasses.asdict(config).items() if v is not None]
    killed = []
    for point in KILL_POINTS:
        if (tmp_path / "b" / point).exists():
            continue  # the previous run got past it before the kill landed
        log = open(tmp_path / f"run-{len(killed)}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        marker = tmp_path / "b" / point
        wait_until(lambda m=marker, p=proc: m.exists() or p.poll() is not None, 300)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        killed.append(point)
    assert len(killed) >= 6, killed
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    a, b = Registry(str(db_a)), Registry(str(db_b))
    assert [_comparable(v, tmp_path / "a") for v in a.list()] == [
        _comparable(v, tmp_path / "b") for v in b.list()
    ]
    assert [(e["version"], e["action"]) for e in a.history()] == [
        (e["version"], e["action"]) for e in b.history()
    ]
