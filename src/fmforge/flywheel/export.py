"""Turn stored feedback into training data: SFT examples and DPO preference pairs (JSON lines).

SFT: an answer someone liked (latest thumbs "up", or a latest rating of 4 or 5) or an edited answer
(the edit replaces the answer). DPO: (prompt, chosen, rejected) from a pairwise choice, from an edit
(the edit beats the original answer) and from thumbs on the same prompt (each liked answer beats
each disliked one). Chat generations give conversational records (`messages`, or `prompt`/`chosen`/
`rejected` as message lists, the layout TRL reads); completions give plain-text records.

Exports are deterministic (records sorted by their canonical JSON) and deduplicated: a record
appears at most once however many times the same feedback was given.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from fmforge.errors import UserError
from fmforge.flywheel.store import FeedbackStore

FORMATS = ("sft", "dpo")


def _canonical(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def _prompt_of(generation: dict[str, Any]) -> Any:
    return generation["messages"] if generation["endpoint"] == "chat" else generation["prompt"]


def _latest(rows: list[dict[str, Any]]) -> dict[tuple[str, int, str], dict[str, Any]]:
    # The newest feedback of each kind on each (generation, choice); rows come in insertion order.
    latest: dict[tuple[str, int, str], dict[str, Any]] = {}
    for row in rows:
        latest[(row["generation_id"], row["choice_index"], row["kind"])] = row
    return latest


def _verdicts(store: FeedbackStore):
    """Return generations by id, liked and disliked (gen, choice) sets, edits and pairwise rows."""
    rows = store.list_feedback()
    latest = _latest(rows)
    generations = {}
    for gen_id in {row["generation_id"] for row in rows}:
        generation = store.get_generation(gen_id)
        if generation is not None:
            generations[gen_id] = generation
    liked, disliked, edits = set(), set(), {}
    for (gen_id, choice, kind), row in latest.items():
        value = row["value"]
        if kind == "thumbs":
            (liked if value == "up" else disliked).add((gen_id, choice))
        elif kind == "rating" and value >= 4:
            liked.add((gen_id, choice))
        elif kind == "rating" and value <= 2:
            disliked.add((gen_id, choice))
        elif kind == "edit":
            edits[(gen_id, choice)] = value
    pairwise = [row for row in rows if row["kind"] == "pairwise"]
    return generations, liked, disliked, edits, pairwise


def sft_records(store: FeedbackStore) -> list[dict[str, Any]]:
    """Return SFT examples from liked and edited answers, deduplicated and sorted."""
    generations, liked, disliked, edits, _ = _verdicts(store)
    answers = []
    for gen_id, choice in liked - set(edits):
        if (gen_id, choice) not in disliked:
            answers.append((generations[gen_id], generations[gen_id]["outputs"][choice]))
    for (gen_id, _choice), text in edits.items():
        answers.append((generations[gen_id], text))
    records = {}
    for generation, answer in answers:
        if generation["endpoint"] == "chat":
            record = {
                "messages": [*generation["messages"], {"role": "assistant", "content": answer}]
            }
        else:
            record = {"prompt": generation["prompt"], "completion": answer}
        records[_canonical(record)] = record
    return [records[key] for key in sorted(records)]


def dpo_records(store: FeedbackStore) -> list[dict[str, Any]]:
    """Return DPO (prompt, chosen, rejected) pairs, deduplicated and sorted."""
    generations, liked, disliked, edits, pairwise = _verdicts(store)
    pairs: list[tuple[dict[str, Any], str, str]] = []
    for row in pairwise:
        generation = generations[row["generation_id"]]
        outputs = generation["outputs"]
        pairs.append(
            (generation, outputs[row["value"]["chosen"]], outputs[row["value"]["rejected"]])
        )
    for (gen_id, choice), text in edits.items():
        generation = generations[gen_id]
        pairs.append((generation, text, generation["outputs"][choice]))
    # Thumbs on the same prompt: group answers by the canonical prompt.
    by_prompt: dict[str, dict[str, list]] = defaultdict(lambda: {"up": [], "down": [], "gen": []})
    for label, cells in (("up", liked), ("down", disliked)):
        for gen_id, choice in cells:
            generation = generations[gen_id]
            key = _canonical([generation["endpoint"], _prompt_of(generation)])
            by_prompt[key][label].append(generation["outputs"][choice])
            by_prompt[key]["gen"].append(generation)
    for group in by_prompt.values():
        generation = min(group["gen"], key=lambda g: g["id"])
        for chosen in group["up"]:
            for rejected in group["down"]:
                pairs.append((generation, chosen, rejected))
    records = {}
    for generation, chosen, rejected in pairs:
        if chosen == rejected:
            continue
        if generation["endpoint"] == "chat":
            record = {
                "prompt": generation["messages"],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            }
        else:
            record = {"prompt": generation["prompt"], "chosen": chosen, "rejected": rejected}
        records[_canonical(record)] = record
    return [records[key] for key in sorted(records)]


def export(store: FeedbackStore, fmt: str, out: str | os.PathLike) -> int:
    """Write the `fmt` ("sft" or "dpo") records to `out` as JSON lines; return how many."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is unknown (choose from {', '.join(FORMATS)})")
    records = sft_records(store) if fmt == "sft" else dpo_records(store)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(_canonical(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return len(records)
