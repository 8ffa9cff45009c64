"""The adaptation methods, one object each, in one table (`METHODS`).

| method | transformation | scores | trains | adapted dir holds |
|---|---|---|---|---|
| majority | none | the most frequent train label | nothing | the label |
| full | + linear head | head on the last token | every parameter | model/ + head |
| freeze | + linear head | head | the top k blocks + final norm + head | model/ + head |
| linear-probe | + linear head | head | the head | head |
| lora | LoRA on target linears | label-word log-likelihood | the LoRA matrices | PEFT LoRA |
| prompt-tuning | soft prompt | label-word log-likelihood | n virtual tokens | PEFT prompt |
| pet | LoRA | label words, several patterns | the LoRA matrices | PEFT LoRA |
| icl | none | label words after k demonstrations | nothing | the recipe |
| ensemble | none | label words, averaged over patterns | nothing | the recipe |

A `Method` knows its name, its defaults (peak LR, its step scale in `adapt compare`), the
`AdaptOptions` fields it reads (the CLI offers exactly those as flags), how to run on a task,
what it writes into an adapted dir and how to read that back. Everything else (the CLI, `adapt
compare`, `adapt.adapted`) asks the table instead of testing method names.

This module imports torch only inside methods, so the CLI can build its parsers from the table.
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmforge.adapt.options import AdaptOptions
from fmforge.errors import UserError

# The options every method reads; each method adds its own (`Method.flags`).
COMMON_FLAGS = ("seed", "max_text_tokens", "threads")
TRAINING_FLAGS = ("max_steps", "batch_size", "lr")
LORA_FLAGS = ("rank", "alpha", "dropout", "targets")


@dataclass
class MethodRun:
    """What one method produced: the results row and what its `save` needs."""

    row: dict[str, Any]
    classifier: Any = None  # an nn.Module for methods that train
    extra: dict[str, Any] = field(default_factory=dict)


class Method:
    """One adaptation method. Subclasses fill in `run` and, when they write files, save/load."""

    name: str = ""
    trains: bool = False
    lr: float | None = None  # default peak LR for methods that train
    compare_step_scale: int = 1  # `adapt compare` trains for --max-steps times this
    flags: tuple[str, ...] = ()  # AdaptOptions fields this method reads, besides COMMON_FLAGS

    def option_names(self) -> tuple[str, ...]:
        """Return the AdaptOptions fields this method reads (the CLI's flags)."""
        return COMMON_FLAGS + (TRAINING_FLAGS if self.trains else ()) + self.flags

    def run(self, loaded, task, options: AdaptOptions, run_dir: str | None = None) -> MethodRun:
        raise NotImplementedError

    def compare_rows(self, loaded, task, options: AdaptOptions, first: bool) -> list[dict]:
        """Return this method's rows of `adapt compare` at one K (`first`: the smallest K)."""
        steps = options.max_steps * self.compare_step_scale
        return [self.run(loaded, task, _with(options, max_steps=steps)).row]

    def meta(self, run: MethodRun) -> dict[str, Any]:
        """Return what adapt.json records besides the common fields."""
        return {}

    def model_in_dir(self) -> bool:
        """True when the adapted dir holds its own model/ (the base is not needed to load it)."""
        return False

    def save(self, run: MethodRun, out: Path, loaded, base: str, fingerprint: str, task) -> None:
        """Write the method's files into the (temporary) adapted dir `out`."""

    def load(self, directory: Path, meta: dict[str, Any], loaded, label_ids) -> Any:
        """Return the classifier an adapted dir holds (None: a prompt or a rule)."""
        return None

    def test_accuracy(self, classifier, meta: dict[str, Any], loaded, task) -> float:
        """Return test accuracy of an adapted dir read back by `load`."""
        import torch

        from fmforge.adapt.classifier import accuracy, encode, predict_proba

        max_tokens = meta["options"]["max_text_tokens"]
        probs = torch.stack(
            [
                predict_proba(classifier, encode(loaded.tokenizer, task, task.test, p, max_tokens))
                for p in meta["patterns"]
            ]
        ).mean(0)
        return accuracy(probs, [task.label_index(e.label) for e in task.test])


def _with(options: AdaptOptions, **changes: Any) -> AdaptOptions:
    from dataclasses import asdict

    return AdaptOptions(**{**asdict(options), **changes})


def _test_labels(task) -> list[int]:
    return [task.label_index(e.label) for e in task.test]


def _row(method: str, task) -> dict[str, Any]:
    return {
        "method": method,
        "examples_per_class": task.provenance.get("examples_per_class"),
        "trainable_params": 0,
        "train_seconds": 0.0,
    }


def _finish(row: dict[str, Any], measure) -> dict[str, Any]:
    row["peak_memory_mb"] = round(measure.peak_memory_mb, 1)
    row["accuracy"] = round(row["accuracy"], 4)
    return row


# ---------------------------------------------------------------------------------------------
# Methods that train nothing: a rule or a prompt.
# ---------------------------------------------------------------------------------------------


class Majority(Method):
    name = "majority"

    def run(self, loaded, task, options, run_dir=None) -> MethodRun:
        from fmforge.adapt.training import Measure

        row = _row(self.name, task)
        with Measure() as measure:
            label = Counter(e.label for e in task.train).most_common(1)[0][0]
        row["accuracy"] = sum(e.label == label for e in task.test) / len(task.test)
        return MethodRun(_finish(row, measure), extra={"label": label})

    def meta(self, run: MethodRun) -> dict[str, Any]:
        return {"majority_label": run.extra["label"]}

    def test_accuracy(self, classifier, meta, loaded, task) -> float:
        return sum(e.label == meta["majority_label"] for e in task.test) / len(task.test)


class _Prompted(Method):
    """A prompt recipe over the frozen base: re-run to evaluate an adapted dir."""

    def test_accuracy(self, classifier, meta, loaded, task) -> float:
        return self.run(loaded, task, AdaptOptions(**meta["options"])).row["accuracy"]


class ICL(_Prompted):
    name = "icl"
    flags = ("shots",)

    def run(self, loaded, task, options, run_dir=None) -> MethodRun:
        from fmforge.adapt.classifier import PATTERNS, accuracy
        from fmforge.adapt.icl import icl_probs
        from fmforge.adapt.training import Measure

        row = _row(self.name, task)
        with Measure() as measure:
            probs, used = icl_probs(
                loaded,
                task,
                task.test,
                options.shots,
                PATTERNS[0],
                options.seed,
                options.max_text_tokens,
                options.eval_batch_size,
            )
        row.update(accuracy=accuracy(probs, _test_labels(task)), shots=used)
        return MethodRun(_finish(row, measure))

    def compare_rows(self, loaded, task, options, first: bool) -> list[dict]:
        # Zero-shot once (it uses no examples), then one demonstration per class at every K.
        rows = []
        if first:
            rows.append({**self.run(loaded, task, _with(options, shots=0)).row})
            rows[-1]["examples_per_class"] = 0
        rows.append(self.run(loaded, task, _with(options, shots=len(task.labels))).row)
        return rows


class Ensemble(_Prompted):
    name = "ensemble"
    flags = ("shots", "patterns")

    def run(self, loaded, task, options, run_dir=None) -> MethodRun:
        from fmforge.adapt.classifier import accuracy
        from fmforge.adapt.ensemble import ensemble_probs
        from fmforge.adapt.training import Measure

        row = _row(self.name, task)
        with Measure() as measure:
            probs, members = ensemble_probs(
                loaded,
                task,
                task.test,
                options.shots,
                options.patterns,
                options.seed,
                options.max_text_tokens,
                options.eval_batch_size,
            )
        row.update(accuracy=accuracy(probs, _test_labels(task)), shots=options.shots)
        row["member_accuracies"] = [m["accuracy"] for m in members]
        row["mean_member_accuracy"] = round(sum(row["member_accuracies"]) / len(members), 6)
        return MethodRun(_finish(row, measure), extra={"members": members})

    def compare_rows(self, loaded, task, options, first: bool) -> list[dict]:
        return [self.run(loaded, task, _with(options, shots=len(task.labels))).row]

    def meta(self, run: MethodRun) -> dict[str, Any]:
        return {"members": run.extra["members"]}


# ---------------------------------------------------------------------------------------------
# Methods that train through the one Trainer (adapt/training.py).
# ---------------------------------------------------------------------------------------------


class _Trained(Method):
    trains = True

    def build(self, lm, task, tokenizer, options: AdaptOptions):
        """Apply the method to `lm` in place; return (classifier, trainable parameters)."""
        raise NotImplementedError

    def patterns(self, options: AdaptOptions) -> list[str]:
        from fmforge.adapt.classifier import PATTERNS

        return PATTERNS[:1]

    def train_data(self, tokenizer, task, patterns: list[str], options: AdaptOptions):
        from fmforge.adapt.classifier import encode

        return encode(tokenizer, task, task.train, patterns[0], options.max_text_tokens)

    def test_probs(self, classifier, tokenizer, task, patterns: list[str], options: AdaptOptions):
        from fmforge.adapt.classifier import encode, predict_proba

        test = encode(tokenizer, task, task.test, patterns[0], options.max_text_tokens)
        return predict_proba(classifier, test, options.eval_batch_size)

    def run(self, loaded, task, options, run_dir=None) -> MethodRun:
        from fmforge.adapt.classifier import accuracy
        from fmforge.adapt.freeze import count_parameters
        from fmforge.adapt.training import Measure, train_classifier

        row = _row(self.name, task)
        tokenizer = loaded.tokenizer
        patterns = self.patterns(options)
        lr = options.lr or self.lr
        with Measure() as measure:
            lm = copy.deepcopy(loaded.model)
            classifier, trainable = self.build(lm, task, tokenizer, options)
            data = self.train_data(tokenizer, task, patterns, options)
            with tempfile.TemporaryDirectory(prefix="fmforge-adapt-") as tmp:
                summary = train_classifier(classifier, trainable, data, options, lr, run_dir or tmp)
        probs = self.test_probs(classifier, tokenizer, task, patterns, options)
        row.update(
            accuracy=accuracy(probs, _test_labels(task)),
            trainable_params=count_parameters(trainable),
            train_seconds=round(measure.seconds, 2),
            steps=summary["steps"],
            final_loss=round(summary["final_loss"], 4),
            lr=lr,
        )
        extra = {"patterns": patterns, "history": summary["history"], "lr": lr}
        return MethodRun(_finish(row, measure), classifier, extra)


class Head(_Trained):
    """A linear head on the last token's hidden state, with all, some or none of the base."""

    def __init__(self, name: str, lr: float, trains_base: str, flags: tuple[str, ...] = ()):
        self.name, self.lr, self.trains_base, self.flags = name, lr, trains_base, flags

    def build(self, lm, task, tokenizer, options):
        from fmforge.adapt.classifier import HeadClassifier
        from fmforge.adapt.freeze import freeze_all, trainable_parameters, unfreeze_top_blocks

        classifier = HeadClassifier(lm, len(task.labels))
        if self.trains_base != "all":
            freeze_all(lm)
        if self.trains_base == "top":
            unfreeze_top_blocks(lm, options.top_blocks)
        return classifier, trainable_parameters(classifier)

    def model_in_dir(self) -> bool:
        return self.trains_base != "none"  # the base changed: the dir keeps its own copy

    def save(self, run, out, loaded, base, fingerprint, task) -> None:
        from safetensors.torch import save_file

        from fmforge.model.load import save_model_dir

        head = run.classifier.head.state_dict()
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in head.items()},
            str(out / "head.safetensors"),
        )
        if self.model_in_dir():
            save_model_dir(run.classifier.lm, loaded.tokenizer, out / "model", loaded.provenance)

    def load(self, directory, meta, loaded, label_ids):
        from safetensors.torch import load_file

        from fmforge.adapt.classifier import HeadClassifier

        classifier = HeadClassifier(loaded.model, len(meta["labels"]))
        classifier.head.load_state_dict(load_file(str(directory / "head.safetensors")))
        return classifier


class LoRA(_Trained):
    name = "lora"
    lr = 3e-3
    compare_step_scale = 6
    flags = LORA_FLAGS

    def build(self, lm, task, tokenizer, options):
        from fmforge.adapt.classifier import VerbalizerClassifier, label_token_ids
        from fmforge.adapt.lora import apply_lora, lora_parameters

        apply_lora(lm, options.targets, options.rank, options.alpha, options.dropout)
        return VerbalizerClassifier(lm, label_token_ids(tokenizer, task)), lora_parameters(lm)

    def save(self, run, out, loaded, base, fingerprint, task) -> None:
        from fmforge.adapt.lora import save_lora_adapter

        save_lora_adapter(run.classifier.lm, out, base, fingerprint, {"task": task.name})

    def load(self, directory, meta, loaded, label_ids):
        from fmforge.adapt.classifier import VerbalizerClassifier
        from fmforge.adapt.lora import load_lora_adapter

        lm = copy.deepcopy(loaded.model)
        load_lora_adapter(lm, directory, meta["base_fingerprint"])
        return VerbalizerClassifier(lm, label_ids)


class PET(LoRA):
    """Pattern-exploiting training: one LoRA adapter over several cloze patterns (adapt/pet.py)."""

    name = "pet"
    flags = LORA_FLAGS + ("patterns",)

    def patterns(self, options):
        from fmforge.adapt.classifier import PATTERNS

        return PATTERNS[: max(1, options.patterns)]

    def train_data(self, tokenizer, task, patterns, options):
        from fmforge.adapt.pet import multi_pattern_data

        return multi_pattern_data(tokenizer, task, task.train, patterns, options.max_text_tokens)

    def test_probs(self, classifier, tokenizer, task, patterns, options):
        from fmforge.adapt.pet import pattern_ensemble_probs

        return pattern_ensemble_probs(
            classifier,
            tokenizer,
            task,
            task.test,
            patterns,
            options.max_text_tokens,
            options.eval_batch_size,
        )


class PromptTuning(_Trained):
    name = "prompt-tuning"
    lr = 3e-3  # embeddings have norm ~1: 3e-2 in Adam throws the prompt off-manifold
    compare_step_scale = 6
    flags = ("virtual_tokens",)

    def build(self, lm, task, tokenizer, options):
        from fmforge.adapt.classifier import VerbalizerClassifier, label_token_ids
        from fmforge.adapt.freeze import freeze_all
        from fmforge.adapt.prompt_tuning import soft_prompt_from_tokens

        if options.virtual_tokens < 1:
            raise UserError(f"--virtual-tokens must be >= 1, got {options.virtual_tokens}")
        freeze_all(lm)
        label_ids = label_token_ids(tokenizer, task)
        words = [i for ids in label_ids for i in ids]
        soft_prompt = soft_prompt_from_tokens(lm, options.virtual_tokens, words)
        classifier = VerbalizerClassifier(lm, label_ids, soft_prompt)
        return classifier, [soft_prompt.embeddings]

    def save(self, run, out, loaded, base, fingerprint, task) -> None:
        from safetensors.torch import save_file

        from fmforge.artifacts import write_json_atomic

        embeddings = run.classifier.soft_prompt.embeddings.detach().cpu().contiguous()
        save_file({"prompt_embeddings": embeddings}, str(out / "adapter_model.safetensors"))
        config = loaded.config
        write_json_atomic(
            out / "adapter_config.json",
            {
                "peft_type": "PROMPT_TUNING",
                "task_type": "CAUSAL_LM",
                "base_model_name_or_path": base,
                "num_virtual_tokens": embeddings.shape[0],
                "token_dim": embeddings.shape[1],
                "num_transformer_submodules": 1,
                "num_attention_heads": config.num_attention_heads,
                "num_layers": config.num_hidden_layers,
                "prompt_tuning_init": "TEXT",
                "inference_mode": True,
            },
        )

    def load(self, directory, meta, loaded, label_ids):
        from safetensors.torch import load_file

        from fmforge.adapt.classifier import VerbalizerClassifier
        from fmforge.adapt.prompt_tuning import SoftPrompt

        embeddings = load_file(str(directory / "adapter_model.safetensors"))["prompt_embeddings"]
        soft_prompt = SoftPrompt(embeddings.shape[0], embeddings.shape[1], embeddings)
        return VerbalizerClassifier(loaded.model, label_ids, soft_prompt)


# Peak learning rates were tuned on the 4M quickstart model (fortunes-topic, K=128, 120 steps:
# lora 3e-3 0.28 vs 1e-2 0.22; linear-probe 3e-2 0.31 vs 1e-2 0.23 at 40 steps).
# compare_step_scale: the label-word methods move a pretrained next-token distribution through a
# small change (an adapter, a soft prompt) read at one position; on the 4M quickstart model they
# stay near chance after 40 steps (lora on fortunes-topic, K=128: 0.24 at 40 steps, 0.28 at 120,
# 0.36 at 240; pet 0.28 at 120, 0.37 at 240). The heads see every position and already learn in
# 40. Every results row records its steps.
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Majority(),
        Head("full", 3e-4, trains_base="all"),
        Head("freeze", 1e-3, trains_base="top", flags=("top_blocks",)),
        Head("linear-probe", 3e-2, trains_base="none"),
        LoRA(),
        PromptTuning(),
        PET(),
        ICL(),
        Ensemble(),
    )
}


def get_method(name: str) -> Method:
    """Return the method called `name`; UserError naming the closest for an unknown one."""
    if name not in METHODS:
        import difflib

        close = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown method {name!r}: choose one of {list(METHODS)}{hint}")
    return METHODS[name]


def run_method(
    name: str, loaded, task, options: AdaptOptions, run_dir: str | None = None
) -> MethodRun:
    """Adapt (a copy of) `loaded` to `task` with the method `name`; evaluate on the test split."""
    import torch

    method = get_method(name)
    torch.manual_seed(options.seed)
    if loaded.tokenizer is None:
        raise UserError(f"{loaded.source}: the model dir has no tokenizer.json")
    return method.run(loaded, task, options, run_dir)
