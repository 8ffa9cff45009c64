"""Labelled classification tasks built from data that ships in packages, or from a user's jsonl.

Every task has fixed, seeded train/validation/test splits (made per class, so each split holds
every label) and a verbalizer: the word each label is spelled as when a language model scores it.
`examples_per_class=K` keeps the first K training examples of each class in the seeded order, so
K=8 is a subset of K=32 and every method in `fmforge adapt compare` sees the same examples.

| task | source (install) | labels |
|---|---|---|
| fortunes-topic | apt fortunes: games/fortunes/<category> | computers science politics food law |
| wordnet-supersense | apt wordnet-base: data.noun | animal food plant person artifact location |
| chat-topic-en, -ko | pip chatterbot-corpus: data/<lang>/*.yml | conversation categories |
| FILE.jsonl | one {"text": ..., "label": ...} per line | the labels in the file |
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fmforge.errors import DataError, UserError

FORTUNES_DIR = Path("/usr/share/games/fortunes")
WORDNET_DIR = Path("/usr/share/wordnet")
MAX_TEXT_CHARS = 500  # longer entries are dropped: they would be truncated anyway


@dataclass
class Example:
    """One labelled text."""

    text: str
    label: str


@dataclass
class Task:
    """A classification task with fixed splits and a label -> word verbalizer."""

    name: str
    labels: list[str]  # in a fixed order: class index i is labels[i]
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    verbalizer: dict[str, str]  # label -> the word a language model scores for it
    description: str = ""
    provenance: dict = field(default_factory=dict)

    def label_index(self, label: str) -> int:
        """Return the class index of `label`."""
        return self.labels.index(label)

    def sizes(self) -> dict[str, int]:
        """Return the number of examples in each split."""
        return {
            "train": len(self.train),
            "validation": len(self.validation),
            "test": len(self.test),
        }


@dataclass
class TaskSpec:
    """How to build a named task and what to install when its data is missing."""

    name: str
    reader: Callable[[], dict[str, list[str]]]  # label -> texts
    install: str
    description: str
    verbalizer: dict[str, str] = field(default_factory=dict)  # defaults to the label itself
    test_per_class: int = 30
    validation_per_class: int = 10


# --- readers: label -> list of texts ----------------------------------------------------------

FORTUNE_CATEGORIES = ["computers", "science", "politics", "food", "law"]


def _clean(text: str) -> str:
    return " ".join(text.split())


def read_fortunes() -> dict[str, list[str]]:
    """Return the entries of the clean fortune categories, split on lines holding only %."""
    if not (FORTUNES_DIR / "computers").is_file():
        raise UserError(
            "task fortunes-topic needs the fortunes data; run: apt-get install fortunes"
        )
    texts = {}
    for category in FORTUNE_CATEGORIES:
        entries = fortune_entries(FORTUNES_DIR / category)
        texts[category] = [e for e in entries if len(e) <= MAX_TEXT_CHARS]
    return texts


def fortune_entries(path: Path) -> list[str]:
    """Return the non-empty, whitespace-normalised entries of a fortune file (split on `%`)."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    return [e for e in (_clean(e) for e in re.split(r"(?m)^%\s*$", raw)) if e]


# lexfile number (second field of a data.noun line) -> supersense label
WORDNET_SUPERSENSES = {
    5: "animal",
    13: "food",
    20: "plant",
    18: "person",
    6: "artifact",
    15: "location",
}
WORDNET_PER_CLASS = 600  # a manageable subset: the first synsets of each class in file order


@dataclass(frozen=True)
class Synset:
    """One line of a WordNet data file: lexicographer file, lemmas and the gloss."""

    lexfile: int  # the second field: 5 = noun.animal, ... (the supersense)
    lemmas: tuple[str, ...]  # underscores turned into spaces
    gloss: str  # after the first "|": the definition, then '; "usage example"'s

    @property
    def definition(self) -> str:
        """Return the gloss up to its first `;` (the definition, without examples)."""
        return self.gloss.split(";")[0].strip()

    @property
    def examples(self) -> list[str]:
        """Return the gloss's quoted usage examples."""
        parts = [p.strip() for p in self.gloss.split(";")]
        return [p.strip('"') for p in parts if p.startswith('"')]


def iter_wordnet(part_of_speech: str = "noun") -> Iterator[Synset]:
    """Yield the synsets of WordNet's data.<part_of_speech> in file order (UserError if absent)."""
    path = WORDNET_DIR / f"data.{part_of_speech}"
    if not path.is_file():
        raise UserError(f"{path} is missing; run: apt-get install wordnet-base")
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            fields, gloss = line.split("|", 1)
            parts = fields.split()
            count = int(parts[3], 16)  # the number of lemmas, in hexadecimal
            lemmas = tuple(parts[4 + 2 * i].replace("_", " ") for i in range(count))
            yield Synset(int(parts[1]), lemmas, gloss.strip())


def read_wordnet_supersense() -> dict[str, list[str]]:
    """Return "lemma: gloss" texts for six noun supersenses from WordNet's data.noun."""
    if not (WORDNET_DIR / "data.noun").is_file():
        raise UserError("task wordnet-supersense needs WordNet; run: apt-get install wordnet-base")
    texts: dict[str, list[str]] = {label: [] for label in WORDNET_SUPERSENSES.values()}
    for synset in iter_wordnet("noun"):
        label = WORDNET_SUPERSENSES.get(synset.lexfile)
        if label is not None and len(texts[label]) < WORDNET_PER_CLASS:
            texts[label].append(wordnet_supersense_text(synset))
    return texts


def wordnet_supersense_text(synset: Synset) -> str:
    """Return the text wordnet-supersense classifies for a synset: "first lemma: definition"."""
    return f"{synset.lemmas[0]}: {synset.definition}"


CHAT_CATEGORIES = {
    "english": ["ai", "coding", "emotion", "literature", "psychology", "trivia"],
    "korean": ["ai", "emotion", "literature", "psychology", "money", "humor"],
}
CHAT_PER_CLASS = 200


def _chatterbot_dir() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "chat-topic tasks need chatterbot-corpus; run: pip install chatterbot-corpus"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def read_chatterbot(language: str) -> dict[str, list[str]]:
    """Return the first two turns of each conversation, by chatterbot category file."""
    import yaml

    root = _chatterbot_dir() / language
    texts = {}
    for name in CHAT_CATEGORIES[language]:
        path = root / f"{name}.yml"
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise DataError(f"{path}: unreadable chatterbot file ({e})") from e
        rows = []
        for conversation in data.get("conversations") or []:
            turns = [_clean(str(t)) for t in conversation[:2] if t is not None]
            text = " / ".join(turns)
            if 0 < len(text) <= MAX_TEXT_CHARS:
                rows.append(text)
        texts[name.replace("_", " ")] = rows[:CHAT_PER_CLASS]
    return texts


TASKS: dict[str, TaskSpec] = {
    "fortunes-topic": TaskSpec(
        "fortunes-topic",
        read_fortunes,
        "apt-get install fortunes",
        "topic of a fortune-cookie quote",
    ),
    "wordnet-supersense": TaskSpec(
        "wordnet-supersense",
        read_wordnet_supersense,
        "apt-get install wordnet-base",
        "WordNet noun supersense of a word from its gloss",
        verbalizer={"artifact": "object", "location": "place"},
    ),
    "chat-topic-en": TaskSpec(
        "chat-topic-en",
        lambda: read_chatterbot("english"),
        "pip install chatterbot-corpus",
        "category of an English chatbot exchange",
        verbalizer={"ai": "AI"},
        test_per_class=15,
        validation_per_class=5,
    ),
    "chat-topic-ko": TaskSpec(
        "chat-topic-ko",
        lambda: read_chatterbot("korean"),
        "pip install chatterbot-corpus",
        "category of a Korean chatbot exchange (English label words)",
        verbalizer={"ai": "AI"},
        test_per_class=8,
        validation_per_class=3,
    ),
}


# --- splits -----------------------------------------------------------------------------------


def _split(
    texts: dict[str, list[str]], test_per_class: int, validation_per_class: int, seed: int
) -> tuple[list[Example], list[Example], list[Example]]:
    train, validation, test = [], [], []
    for label in sorted(texts):
        unique = sorted(set(texts[label]))  # duplicates would leak between splits
        random.Random(f"{seed}:{label}").shuffle(unique)
        n_test = min(test_per_class, len(unique) // 3)
        n_val = min(validation_per_class, len(unique) // 6)
        if len(unique) - n_test - n_val < 1 or n_test < 1:
            raise DataError(f"label {label!r} has only {len(unique)} examples; need at least 3")
        test += [Example(t, label) for t in unique[:n_test]]
        validation += [Example(t, label) for t in unique[n_test : n_test + n_val]]
        train += [Example(t, label) for t in unique[n_test + n_val :]]
    # Interleave classes in a seeded order so a prefix of the train split is roughly balanced.
    rng = random.Random(seed)
    for split in (train, validation, test):
        rng.shuffle(split)
    return train, validation, test


def take_per_class(examples: list[Example], k: int, labels: list[str]) -> list[Example]:
    """Return the first `k` examples of each label (in split order); UserError if one has fewer."""
    counts = {label: 0 for label in labels}
    kept = []
    for example in examples:
        if counts[example.label] < k:
            counts[example.label] += 1
            kept.append(example)
    short = {label: n for label, n in counts.items() if n < k}
    if short:
        label, n = min(short.items(), key=lambda item: item[1])
        smallest = min(sum(e.label == lb for e in examples) for lb in labels)
        raise UserError(
            f"--examples-per-class {k} is larger than the train split allows: label {label!r} "
            f"has {n} training examples (use K <= {smallest})"
        )
    return kept


def _read_user_jsonl(path: Path) -> dict[str, list[str]]:
    from fmforge.data.sources import iter_jsonl

    texts: dict[str, list[str]] = {}
    for number, record in iter_jsonl(path):
        if not isinstance(record.get("text"), str):
            raise DataError(f'{path}:{number}: expected an object with a string "text"')
        label = record.get("label")
        if not isinstance(label, str | int) or isinstance(label, bool) or str(label) == "":
            raise DataError(f'{path}:{number}: expected a string "label"')
        texts.setdefault(str(label), []).append(_clean(record["text"]))
    if len(texts) < 2:
        raise DataError(f"{path}: a classification task needs at least 2 labels, got {len(texts)}")
    return texts


def load_task(
    name: str,
    examples_per_class: int | None = None,
    seed: int = 0,
    verbalizer: dict[str, str] | None = None,
) -> Task:
    """Return the named task (or a .jsonl file of text/label records) with seeded splits.

    examples_per_class: keep only the first K training examples of each class.
    verbalizer: label -> word overrides; every label must be covered (a UserError names the rest).
    """
    path = Path(name)
    if name in TASKS:
        spec = TASKS[name]
        texts = spec.reader()
        test_n, val_n, base_verbalizer = (
            spec.test_per_class,
            spec.validation_per_class,
            dict(spec.verbalizer),
        )
        provenance = {"task": name, "install": spec.install}
        description = spec.description
    elif path.suffix == ".jsonl" and path.is_file():
        texts = _read_user_jsonl(path)
        smallest = min(len(v) for v in texts.values())
        test_n, val_n, base_verbalizer = max(1, smallest // 5), max(1, smallest // 10), {}
        provenance = {"task": str(path), "sha256": _sha256(path)}
        description = f"user task from {path.name}"
    else:
        import difflib

        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UserError(
            f"unknown task {name!r}: choose one of {sorted(TASKS)} or a .jsonl file with "
            f'"text" and "label" fields{hint}'
        )
    labels = sorted(texts)
    train, validation, test = _split(texts, test_n, val_n, seed)
    if examples_per_class is not None:
        if examples_per_class < 1:
            raise UserError(f"--examples-per-class must be >= 1, got {examples_per_class}")
        train = take_per_class(train, examples_per_class, labels)
    words = {label: base_verbalizer.get(label, label) for label in labels}
    if verbalizer is not None:
        unknown = sorted(set(verbalizer) - set(labels))
        if unknown:
            raise UserError(f"verbalizer names labels not in task {name}: {unknown}")
        missing = [label for label in labels if label not in verbalizer]
        if missing:
            raise UserError(f"labels absent from the verbalizer: {missing}; give a word for each")
        words = dict(verbalizer)
    if len(set(words.values())) < len(words):
        raise UserError(f"verbalizer maps two labels to the same word: {words}")
    provenance.update(seed=seed, examples_per_class=examples_per_class)
    return Task(name, labels, train, validation, test, words, description, provenance)


def parse_verbalizer(spec: str | None) -> dict[str, str] | None:
    """Parse "label=word,label=word" (or a JSON file of the mapping) into a dict."""
    if not spec:
        return None
    if Path(spec).is_file():
        try:
            mapping = json.loads(Path(spec).read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise UserError(f"{spec}: not a JSON object of label -> word ({e.msg})") from e
        if not isinstance(mapping, dict):
            raise UserError(f"{spec}: not a JSON object of label -> word")
        return {str(k): str(v) for k, v in mapping.items()}
    mapping = {}
    for item in spec.split(","):
        label, sep, word = item.partition("=")
        if not sep or not label.strip() or not word.strip():
            raise UserError(f"--verbalizer item {item!r} is not label=word")
        mapping[label.strip()] = word.strip()
    return mapping


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
