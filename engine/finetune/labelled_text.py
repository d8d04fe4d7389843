"""Sentence and sentence-pair tasks as (text, text_pair, label) examples.

Two layouts:

- a GLUE task folder as distributed (CoLA, SST-2, MRPC, QQP, STS-B, MNLI, QNLI, RTE): ``train.tsv`` and
  ``dev.tsv`` (MNLI: ``dev_matched.tsv``), each task with its own columns (``GLUE_TASKS``);
- a plain table: ``train.csv`` / ``train.jsonl`` (and ``dev.*``), or one file, with the fields
  ``text``, optionally ``text_pair``, and ``label`` (a class name, or a number for regression).

Every malformed line is a one-line error naming the file, the line and the fix.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's TSV keeps its fields: column names (or indices, for the headerless CoLA)."""

    text: str | int
    text_pair: str | int | None
    label: str | int
    labels: tuple[str, ...] | None  # the classes in order; None: a regression target (STS-B)
    header: bool = True
    dev: str = "dev.tsv"


GLUE_TASKS = {
    "cola": GlueTask(text=3, text_pair=None, label=1, labels=("0", "1"), header=False),
    "sst2": GlueTask("sentence", None, "label", ("0", "1")),
    "mrpc": GlueTask("#1 String", "#2 String", "Quality", ("0", "1")),
    "qqp": GlueTask("question1", "question2", "is_duplicate", ("0", "1")),
    "stsb": GlueTask("sentence1", "sentence2", "score", None),
    "mnli": GlueTask("sentence1", "sentence2", "gold_label", ("contradiction", "entailment", "neutral"), dev="dev_matched.tsv"),
    "qnli": GlueTask("question", "sentence", "label", ("entailment", "not_entailment")),
    "rte": GlueTask("sentence1", "sentence2", "label", ("entailment", "not_entailment")),
}  # fmt: skip
# GLUE's own folder names (as its download script writes them) for each task.
GLUE_FOLDERS = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "stsb": "STS-B", "mnli": "MNLI",
                "qnli": "QNLI", "rte": "RTE"}  # fmt: skip


@dataclass
class TextExamples:
    """Examples of one split; ``labels`` are class indices into ``classes``, or floats for regression."""

    texts: list[str]
    text_pairs: list[str] | None
    labels: list[int] | list[float]
    classes: list[str] | None

    def __len__(self) -> int:
        return len(self.texts)


def glue_task_of(folder: Path) -> str | None:
    """The GLUE task a folder holds, by its name (``SST-2``, ``sst2``, ``STS-B`` ...), else None."""
    key = folder.name.lower().replace("-", "").replace("_", "")
    return key if key in GLUE_TASKS else None


def read_glue(folder: str | Path, task: str, split: str = "train") -> TextExamples:
    """``split`` ("train" or "dev") of a GLUE task folder."""
    spec = GLUE_TASKS[task]
    path = Path(folder) / ("train.tsv" if split == "train" else spec.dev)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a {GLUE_FOLDERS[task]} folder as GLUE distributes it holds train.tsv and {spec.dev}")
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = (rows[0], rows[1:]) if spec.header else ([], rows)

    def column(name: str | int) -> int:
        if isinstance(name, int):
            return name
        if name not in header:
            raise ValueError(f"{path}: no column {name!r} in its header ({', '.join(header)}); is it a {GLUE_FOLDERS[task]} file?")
        return header.index(name)

    at = {"text": column(spec.text), "label": column(spec.label)}
    if spec.text_pair is not None:
        at["text_pair"] = column(spec.text_pair)
    examples = []
    for number, row in enumerate(rows, start=2 if spec.header else 1):
        if len(row) <= max(at.values()):
            raise ValueError(f"{path}:{number}: {len(row)} fields, the task needs {max(at.values()) + 1}; fix or remove the line")
        examples.append({key: row[i] for key, i in at.items()})
    return _examples(examples, list(spec.labels) if spec.labels else None, str(path), regression=spec.labels is None)


def read_table(path: str | Path, classes: list[str] | None = None) -> TextExamples:
    """A CSV (with a header) or JSONL file of ``text[,text_pair],label``. ``classes`` None: the sorted
    label names of this file, or a regression target when every label is a number and one has a fraction."""
    path = Path(path)
    rows: list[dict] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e}); one object per line: {{\"text\": ..., \"label\": ...}}") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: a JSON object per line is needed, got {type(row).__name__}")
            rows.append({**row, "_line": number})
    elif path.suffix == ".csv":
        with open(path, encoding="utf-8", newline="") as f:
            rows = [{**row, "_line": number} for number, row in enumerate(csv.DictReader(f), start=2)]
    else:
        raise ValueError(f"{path}: give a .csv (with a header) or .jsonl file of text[,text_pair],label")
    for row in rows:
        missing = [k for k in ("text", "label") if row.get(k) in (None, "")]
        if missing:
            raise ValueError(f"{path}:{row['_line']}: no {' or '.join(missing)}; every line needs text and label (text_pair optional)")
    return _examples(rows, classes, str(path))


def _is_number(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _examples(rows: list[dict], classes: list[str] | None, where: str, regression: bool | None = None) -> TextExamples:
    if not rows:
        raise ValueError(f"{where} holds no examples")
    pairs = [("text_pair" in r and r["text_pair"] not in (None, "")) for r in rows]
    if any(pairs) and not all(pairs):
        line = rows[pairs.index(False)].get("_line", pairs.index(False) + 1)
        raise ValueError(f"{where}:{line}: no text_pair where other lines have one; give every line a pair or none")
    raw = [r["label"] for r in rows]
    if regression is None:
        regression = classes is None and all(_is_number(v) for v in raw) and any("." in str(v) for v in raw)
    if regression:
        for i, row in enumerate(rows):
            if not _is_number(row["label"]):
                raise ValueError(f"{where}:{row.get('_line', i + 1)}: label {row['label']!r} is not a number; a regression task needs one")
        labels: list = [float(v) for v in raw]
    else:
        names = [str(v) for v in raw]
        classes = classes if classes is not None else sorted(set(names))
        unknown = sorted(set(names) - set(classes))
        if unknown:
            raise ValueError(f"{where}: label(s) {', '.join(unknown[:5])} are not among the task's classes ({', '.join(classes)})")
        labels = [classes.index(n) for n in names]
    return TextExamples(
        texts=[str(r["text"]) for r in rows],
        text_pairs=[str(r["text_pair"]) for r in rows] if all(pairs) else None,
        labels=labels,
        classes=None if regression else list(classes),
    )
