"""Experiment: which self-supervised objective makes the most useful encoder?

Claim (Devlin et al. 2019; Gao et al. 2021): with the same size, tokenizer and token budget,
masked-LM pretraining gives better text features than next-token prediction, and contrastive
training (unsupervised SimCSE, from the MLM checkpoint) makes sentence similarity far better.

Setup, all on CPU (the features and measures live in `encoder_measures.py`):
1. a modern-English corpus from the packages the probe tasks need (every WordNet gloss and
   fortune), minus every evaluation text; a WordPiece tokenizer and token shards of it;
2. three models of the same width and depth (d 128, 2 layers): a causal decoder (`pretrain`,
   next-token), a BERT masked LM (`--objective mlm`) and unsupervised SimCSE from that MLM
   checkpoint (`--objective contrastive` on single sentences of the corpus, each its own
   positive); the causal and MLM runs see the same tokens. The causal run trains in one process
   while the MLM and then SimCSE train in another (one thread each). Each model has a
   random-init twin (the same architecture and init, untrained);
3. features: mean-pooled last hidden states;
4. probe: standardised features, multinomial logistic regression (L2), 5-fold cross-validated
   accuracy over every labelled example, with a 95% bootstrap interval, on the shipped tasks
   wordnet-supersense, fortunes-topic and chat-topic-en;
5. sentence similarity: Spearman of cosine similarities on the STS Benchmark dev split
   (../shared/data/stsb, skipped when absent), the SimCSE paper's own measure;
6. retrieval: a WordNet usage example ("the dog barked") -> its synset's gloss, a fixed seeded
   sample; recall@1 and recall@10, with BM25 as a baseline and minilm-l6 as the ceiling.

Writes `results.json` (`probe`, `sts_dev_spearman`, `retrieval`, budgets), `report.md` and
`objectives.png`.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmforge.artifacts import check_output_dir, write_json_atomic
from fmforge.config import PretrainConfig
from fmforge.errors import UserError
from fmforge.experiments.encoder_measures import (
    STSB,
    TASKS,
    Embed,
    bm25_recall,
    decoder_features,
    encoder_features,
    probe_task,
    retrieval_recall,
    sts_dev,
    task_examples,
    usage_gloss_pairs,
)

WIDTH = dict(hidden_size=128, intermediate_size=512, num_attention_heads=4)
VOCAB_SIZE = 4096
# Budgets sized so the whole run fits 40 minutes on 2 CPU cores (docs/encoders.md has the timing):
# the `fmforge pretrain --objective mlm` recipe of docs/encoders.md, for every objective.
DEFAULT_LAYERS = 2
DEFAULT_STEPS = 4000  # causal and masked-LM optimizer steps of BATCH_SIZE x SEQ_LEN tokens each
BATCH_SIZE = 64
SEQ_LEN = 32
INIT_STD = 0.05  # fresh encoders (BERT's initializer_range; 0.02 learns slower on CPU budgets)
CAUSAL_LR = 2e-3
MLM_LR = 2e-3
DEFAULT_SIMCSE_STEPS = 2000
DEFAULT_SIMCSE_LR = 5e-4
CHECKPOINT_EVERY = 500  # also what a post-hoc look at the training curve reads


def _say(message: str) -> None:
    import sys

    print(f"[objectives] {message}", file=sys.stderr, flush=True)


# --- corpus -------------------------------------------------------------------------------------


def held_out_texts(pairs: list[tuple[str, str]]) -> set[str]:
    """Return every evaluation text the pretraining corpus must not contain: every labelled text
    of the probe tasks (all their splits: the probe cross-validates over them) and both sides of
    the retrieval pairs (whitespace-normalised)."""
    texts = {" ".join(t.split()) for pair in pairs for t in pair}
    for name in TASKS:
        texts.update(e.text for e in task_examples(name))
    return texts


def english_corpus(path: Path, sentences_path: Path, held_out: set[str]) -> dict[str, int]:
    """Write the pretraining corpus (JSONL documents) and SimCSE's sentences; return counts.

    Modern English from the packages the probe tasks already need: every WordNet synset (all
    parts of speech) as "lemma, lemma: gloss" and every entry of every fortune file, minus any
    document that is or holds an evaluation text (`held_out`: checked against the synset's
    task text, its definition and each usage example, and the whole fortune). The sentences
    (one per line) are the kept documents' definitions, usage examples and fortune sentences of
    4 or more words.
    """
    from fmforge.data.tasks import (
        FORTUNES_DIR,
        fortune_entries,
        iter_wordnet,
        wordnet_supersense_text,
    )

    counts = {"wordnet": 0, "fortunes": 0, "held_out_dropped": 0, "sentences": 0}
    with open(path, "w", encoding="utf-8") as f, open(sentences_path, "w", encoding="utf-8") as g:

        def keep(text: str, sentences: list[str]) -> None:
            f.write(json.dumps({"text": text}) + "\n")
            for sentence in sentences:
                if len(sentence.split()) >= 4:
                    g.write(" ".join(sentence.split()) + "\n")
                    counts["sentences"] += 1

        for part in ("noun", "verb", "adj", "adv"):
            for synset in iter_wordnet(part):
                keys = [wordnet_supersense_text(synset), synset.definition, *synset.examples]
                if any(" ".join(k.split()) in held_out for k in keys):
                    counts["held_out_dropped"] += 1
                    continue
                keep(f"{', '.join(synset.lemmas)}: {synset.gloss}", keys[1:])
                counts["wordnet"] += 1
        files = sorted(p for p in FORTUNES_DIR.iterdir() if p.is_file() and not p.suffix)
        for fortune_file in files:
            for entry in fortune_entries(fortune_file):
                if entry in held_out:
                    counts["held_out_dropped"] += 1
                    continue
                keep(entry, re.split(r"(?<=[.!?])\s+", entry))
                counts["fortunes"] += 1
    return counts


def simcse_sentences(sentences: Path, out: Path, count: int, seed: int = 0) -> int:
    """Write `count` seeded sentences as SimCSE pairs (each sentence its own positive).

    Unsupervised SimCSE encodes a sentence twice; the two dropout masks make the two views. A
    supervised-pairs file whose anchor equals its positive is exactly that (two forward passes).
    """
    texts = sentences.read_text(encoding="utf-8").splitlines()
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(texts), size=min(count, len(texts)), replace=False)
    with open(out, "w", encoding="utf-8") as f:
        for i in chosen:
            f.write(json.dumps({"anchor": texts[i], "positive": texts[i]}) + "\n")
    return len(chosen)


# --- training -----------------------------------------------------------------------------------


def _width(layers: int) -> dict[str, int]:
    return {**WIDTH, "num_hidden_layers": layers}


def _config(
    shards: Path,
    steps: int,
    lr: float,
    layers: int,
    *,
    threads: int,
    init_from: str | None = None,
    dropout: float | None = None,
    init_std: float | None = None,
    pairs: Path | None = None,
) -> PretrainConfig:

    # The decoder is the twin of the BERT `small` preset: the same width, depth and heads.
    heads = {"num_key_value_heads": WIDTH["num_attention_heads"]}
    model = {"preset": "small", "init_from": init_from, "dropout": dropout, "init_std": init_std}
    model.update(_width(layers), **heads)
    return PretrainConfig.from_dict(
        {
            "model": model,
            "data": {"shards": str(shards), "pairs": str(pairs) if pairs else ""},
            "train": {
                "max_steps": steps,
                "batch_size": BATCH_SIZE,
                "seq_len": SEQ_LEN,
                "lr": lr,
                "warmup_steps": max(1, min(200, steps // 10)),
                "eval_every": 0,
                "checkpoint_every": min(steps, CHECKPOINT_EVERY),
                "keep_checkpoints": 10,
                "log_every": 10,
            },
            "runtime": {"threads": threads},
        }
    )


def _pretrain_in_turn(jobs: list[tuple[dict, str, str]]) -> dict[str, float]:
    """Train (config dict, run dir, objective) jobs one after another in this (child) process;
    return each objective's training seconds. Each run sets its own thread count (runtime)."""
    from fmforge.train.pretrain import pretrain

    seconds = {}
    for cfg_dict, out, objective in jobs:
        clock = time.perf_counter()
        cfg = PretrainConfig.from_dict(cfg_dict)
        pretrain(cfg, Path(out), overwrite=True, progress=False, objective=objective)
        seconds[objective] = time.perf_counter() - clock
    return seconds


def _train_lanes(lanes: list[list[tuple[PretrainConfig, Path, str]]]) -> dict[str, float]:
    """Run each lane of training jobs in its own process (one thread each), lanes side by side.

    Models this small gain little from a second thread per step; two processes keep both cores
    busy. Returns the training seconds of every objective.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(lanes), mp_context=context) as pool:
        futures = [
            pool.submit(_pretrain_in_turn, [(c.to_dict(), str(o), j) for c, o, j in lane])
            for lane in lanes
        ]
        return {k: v for future in futures for k, v in future.result().items()}


def run_objectives(
    out: str | Path,
    steps: int = DEFAULT_STEPS,
    simcse_steps: int = DEFAULT_SIMCSE_STEPS,
    layers: int = DEFAULT_LAYERS,
    overwrite: bool = False,
    simcse_lr: float = DEFAULT_SIMCSE_LR,
) -> dict[str, Any]:
    """Run the experiment into `out`; return results.json's contents."""
    from fmforge.data.pack import prepare_shards
    from fmforge.model.load import load_bundle
    from fmforge.tokenizer import train_from_inputs

    out = Path(out)
    check_output_dir(out, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    _say("1/5 corpus (WordNet glosses + fortunes, minus evaluation texts), tokenizer, shards")
    pairs = usage_gloss_pairs()
    corpus = out / "corpus.jsonl"
    corpus_counts = english_corpus(corpus, out / "sentences.txt", held_out_texts(pairs))
    train_from_inputs([str(corpus)], VOCAB_SIZE, str(out / "tokenizer"), True, kind="wordpiece")
    meta = prepare_shards([str(corpus)], str(out / "tokenizer"), str(out / "shards"), 0.02, 0, True)
    shards = out / "shards"
    runs = out / "runs"
    sentences = simcse_sentences(
        out / "sentences.txt", out / "simcse.jsonl", simcse_steps * BATCH_SIZE
    )
    _say(f"2/5 pretraining, side by side, one thread each: causal | mlm then simcse; causal and "
         f"mlm {steps} steps of {BATCH_SIZE}x{SEQ_LEN} tokens, simcse {simcse_steps}")  # fmt: skip
    causal = _config(shards, steps, CAUSAL_LR, layers, threads=1)
    # The `fmforge pretrain --objective mlm` recipe of docs/encoders.md: no dropout (a short CPU
    # budget underfits); SimCSE puts BERT's 0.1 back, its two views need it.
    mlm = _config(shards, steps, MLM_LR, layers, threads=1, dropout=0.0, init_std=INIT_STD)
    simcse = _config(
        shards, simcse_steps, simcse_lr, layers, threads=1, init_from=str(runs / "mlm" / "final"),
        dropout=0.1, pairs=out / "simcse.jsonl",
    )  # fmt: skip
    # The causal decoder scores every position over the whole vocabulary, the masked LM 15%: its
    # lane has time for SimCSE after the MLM.
    lanes = [[(causal, runs / "causal", "causal")]]
    lanes.append([(mlm, runs / "mlm", "mlm"), (simcse, runs / "contrastive", "contrastive")])
    seconds = _train_lanes(lanes)
    _say(f"training took {', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}")
    _say("3/5 features of trained models and their random-init twins")
    causal = load_bundle(runs / "causal" / "final")
    mlm = load_bundle(runs / "mlm" / "final")
    simcse = load_bundle(runs / "contrastive" / "final")
    twins = _random_twins(causal, mlm, simcse)
    models: dict[str, Embed] = {
        "causal": decoder_features(causal.model, causal.tokenizer),
        "mlm": encoder_features(mlm),
        "contrastive": encoder_features(simcse),
        "causal_random": decoder_features(twins["causal"], causal.tokenizer),
        "mlm_random": encoder_features(twins["mlm"]),
        "contrastive_random": encoder_features(twins["contrastive"]),
    }
    _say("4/5 probes, STS-B dev, usage->gloss retrieval")
    probe = {name: {t: probe_task(embed, t) for t in TASKS} for name, embed in models.items()}
    sts = {name: sts_dev(embed) for name, embed in models.items()}
    pairs = usage_gloss_pairs()
    retrieval = {name: retrieval_recall(embed, pairs) for name, embed in models.items()}
    retrieval["bm25"] = bm25_recall(pairs)
    try:
        minilm = load_bundle("minilm-l6", kind="encoder")
        retrieval["minilm-l6"] = retrieval_recall(encoder_features(minilm), pairs)
        sts["minilm-l6"] = sts_dev(encoder_features(minilm))
    except UserError as e:
        _say(f"minilm-l6 ceiling skipped: {e}")
    results = {
        "probe": probe,
        "sts_dev_spearman": sts,
        "retrieval": retrieval,
        "verdicts": _verdicts(probe, sts, retrieval),
        "budget": {
            "steps": steps,
            "simcse_steps": simcse_steps,
            "simcse_sentences": sentences,
            "batch_size": BATCH_SIZE,
            "seq_len": SEQ_LEN,
            "simcse_lr": simcse_lr,
            "tokens_per_model": steps * BATCH_SIZE * SEQ_LEN,
            "width": _width(layers),
            "training_seconds": {k: round(v, 1) for k, v in seconds.items()},
        },
        "corpus": {**corpus_counts, "train_tokens": meta["splits"]["train"]["tokens"]},
        "retrieval_pairs": len(pairs),
        "stsb": str(STSB) if STSB.is_dir() else None,
        "seconds": round(time.perf_counter() - started, 1),
    }
    _say("5/5 report")
    write_json_atomic(out / "results.json", results)
    _plot(results, out / "objectives.png")
    (out / "report.md").write_text(_report(results), encoding="utf-8")
    return results


def _random_twins(causal, mlm, simcse) -> dict[str, torch.nn.Module]:
    """Return untrained models of the same architectures (seeded init), in eval mode."""
    from fmforge.model.llama import LlamaForCausalLM
    from fmforge.train.encoder_pretrain import fresh_encoder

    # Each twin starts as its model did (the same init), only untrained.
    torch.manual_seed(1)
    twins = {
        "causal": LlamaForCausalLM(causal.config),
        "mlm": fresh_encoder(mlm.config, "mlm"),
        "contrastive": fresh_encoder(simcse.config, "contrastive"),
    }
    for model in twins.values():
        model.eval()
    return {
        "causal": twins["causal"],
        "mlm": _bundle_like(mlm, twins["mlm"]),
        "contrastive": _bundle_like(simcse, twins["contrastive"]),
    }


def _bundle_like(bundle, model):
    from fmforge.model.load import ModelBundle

    return ModelBundle(model, bundle.tokenizer, bundle.config, sentence=bundle.sentence)


def _verdicts(probe: dict, sts: dict, retrieval: dict) -> dict[str, Any]:
    verdicts: dict[str, Any] = {}
    for objective in ("causal", "mlm", "contrastive"):
        wins = [
            t
            for t in TASKS
            if probe[objective][t]["ci_low"] > probe[f"{objective}_random"][t]["ci_high"]
        ]
        verdicts[f"{objective}_beats_random_twin_on"] = wins
    if sts.get("contrastive") is not None and sts.get("mlm") is not None:
        verdicts["simcse_sts_gain"] = round(sts["contrastive"] - sts["mlm"], 4)
    verdicts["simcse_recall10_change"] = round(
        retrieval["contrastive"]["recall_at_10"] - retrieval["mlm"]["recall_at_10"], 4
    )
    return verdicts


def _report(results: dict) -> str:
    budget = results["budget"]
    lines = [
        "# Objectives: causal vs masked LM vs contrastive (SimCSE)",
        "",
        f"Same width and depth ({budget['width']}), WordPiece {VOCAB_SIZE} on WordNet glosses and "
        f"fortunes ({results['corpus']}); causal and "
        f"masked LM {budget['steps']} steps of {budget['batch_size']}x{budget['seq_len']} tokens "
        f"({budget['tokens_per_model']:,} tokens each); SimCSE {budget['simcse_steps']} steps "
        f"from the MLM checkpoint (lr {budget['simcse_lr']}). Wall time "
        f"{results['seconds']:.0f} s; training {budget['training_seconds']} s.",
        "",
        "## Linear probe (5-fold cross-validated accuracy, 95% bootstrap interval)",
        "",
        "| model | " + " | ".join(TASKS) + " |",
        "|---|" + "---|" * len(TASKS),
    ]
    for name, row in results["probe"].items():
        cells = [f"{row[t]['accuracy']:.3f} [{row[t]['ci_low']:.3f}, {row[t]['ci_high']:.3f}]"
                 for t in TASKS]  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## STS-B dev Spearman and usage->gloss retrieval", ""]
    lines += ["| model | STS-B dev | recall@1 | recall@10 |", "|---|---|---|---|"]
    for name, row in results["retrieval"].items():
        sts = results["sts_dev_spearman"].get(name)
        shown = "n/a" if sts is None else f"{sts:.3f}"
        lines.append(f"| {name} | {shown} | {row['recall_at_1']:.3f} | {row['recall_at_10']:.3f} |")
    lines += ["", "## Verdicts", "", "```", json.dumps(results["verdicts"], indent=2), "```", ""]
    lines += ["![objectives](objectives.png)", ""]
    return "\n".join(lines)


def _plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["probe"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(TASKS)
    for i, task in enumerate(TASKS):
        acc = [results["probe"][n][task]["accuracy"] for n in names]
        low = [a - results["probe"][n][task]["ci_low"] for a, n in zip(acc, names)]
        high = [results["probe"][n][task]["ci_high"] - a for a, n in zip(acc, names)]
        xs = np.arange(len(names)) + i * width
        axes[0].bar(xs, acc, width, yerr=[low, high], label=task, capsize=2)
    axes[0].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=30, ha="right")
    axes[0].set_ylabel("probe test accuracy")
    axes[0].legend(fontsize=8)
    retrieval = results["retrieval"]
    axes[1].bar(list(retrieval), [r["recall_at_10"] for r in retrieval.values()])
    axes[1].set_ylabel("usage -> gloss recall@10")
    axes[1].tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
