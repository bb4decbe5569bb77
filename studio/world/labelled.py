"""The eye-labelled set of generated images (assets/world/labelled/): what both instruments are checked on.

`labels.csv` holds, per image, what people saw in it (INSTRUCTIONS.md says how it was labelled), `made.jsonl`
how each image was made (bench/labelled_set.py). Shape "none" means no single clear shape; colour "none"
and background "unclear" mean the labellers could not say, and those entries do not count for that attribute.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from studio.world import ASSETS
from studio.world.vocab import NO_SHAPE, VALUES

FOLDER = ASSETS / "labelled"
ATTRIBUTES = ("shape", "colour", "background")  # what the set labels
UNKNOWN = {"colour": NO_SHAPE, "background": "unclear"}  # a label that does not count for its attribute


@dataclass(frozen=True)
class Entry:
    file: Path
    labels: dict[str, str]
    agreed: bool  # both labellers gave these labels before any third look
    made: dict[str, Any]

    def image(self):
        from PIL import Image

        with Image.open(self.file) as image:
            return image.convert("RGB")


def load_set(folder: str | Path = FOLDER) -> list[Entry]:
    """Every labelled entry; a missing image or a label outside the vocabulary is refused by name."""
    from studio.errors import InvalidArgumentError

    folder = Path(folder)
    table = folder / "labels.csv"
    if not table.is_file():
        raise InvalidArgumentError(f"no labelled set at {folder}: {table} is missing; `git checkout -- {folder}` "
                                   f"restores the shipped one.")
    made: dict[str, dict] = {}
    if (folder / "made.jsonl").is_file():
        for line in (folder / "made.jsonl").read_text().splitlines():
            item = json.loads(line)
            made[item["file"]] = item
    allowed = {"shape": {*VALUES["shape"], NO_SHAPE}, "colour": {*VALUES["colour"], UNKNOWN["colour"]},
               "background": {*VALUES["background"], UNKNOWN["background"]}}
    entries = []
    with open(table, newline="") as handle:
        for row, record in enumerate(csv.DictReader(handle), start=2):
            path = folder / "images" / record["file"]
            if not path.is_file():
                raise InvalidArgumentError(f"{table}, line {row}: the image {path} is missing; restore it or drop "
                                           f"its line.")
            labels = {a: record[a].strip() for a in ATTRIBUTES}
            for attribute, value in labels.items():
                if value not in allowed[attribute]:
                    raise InvalidArgumentError(f"{table}, line {row}: {attribute}={value!r} is not a label; use one "
                                               f"of {', '.join(sorted(allowed[attribute]))}.")
            entries.append(Entry(path, labels, record.get("agreed", "yes").strip() == "yes",
                                 made.get(record["file"], {})))
    return entries


def halves(entries: Sequence[Entry]) -> tuple[list[Entry], list[Entry]]:
    """(calibration, test): the even-numbered images fit the instruments' decision thresholds, the odd ones
    report them."""
    calibration = [e for e in entries if int(e.file.stem) % 2 == 0]
    return calibration, [e for e in entries if int(e.file.stem) % 2 == 1]


def score(predicted: dict[str, Sequence[str]], entries: Sequence[Entry]) -> dict[str, Any]:
    """Accuracy per attribute of `predicted` (as `predict` returns) against the labels, counting only the
    entries whose label for that attribute is known; and the shape confusion {truth: {predicted: count}}."""
    accuracy, counted = {}, {}
    for attribute in ATTRIBUTES:
        pairs = [(p, e.labels[attribute]) for p, e in zip(predicted[attribute], entries, strict=True)
                 if e.labels[attribute] != UNKNOWN.get(attribute)]
        accuracy[attribute] = sum(p == t for p, t in pairs) / max(1, len(pairs))
        counted[attribute] = len(pairs)
    confusion: dict[str, dict[str, int]] = {}
    for p, e in zip(predicted["shape"], entries, strict=True):
        row = confusion.setdefault(e.labels["shape"], {})
        row[p] = row.get(p, 0) + 1
    return {"accuracy": accuracy, "n": counted, "confusion": confusion}


def check(predict: Callable[[list[Any]], dict[str, Sequence[str]]], folder: str | Path = FOLDER, *,
          half: str | None = None) -> dict[str, Any]:
    """Read the set's images with `predict` (an instrument) and score it, also on the agreed entries alone;
    `half` = "calibration" or "test" reads only that half (`halves`)."""
    entries = load_set(folder)
    if half is not None:
        entries = halves(entries)[("calibration", "test").index(half)]
    predicted = predict([e.image() for e in entries])
    result = score(predicted, entries)
    agreed = [i for i, e in enumerate(entries) if e.agreed]
    result["agreed"] = score({a: [predicted[a][i] for i in agreed] for a in ATTRIBUTES},
                             [entries[i] for i in agreed])["accuracy"]
    result["wrong"] = [{"file": e.file.name, "labels": e.labels, "read": {a: predicted[a][i] for a in ATTRIBUTES}}
                       for i, e in enumerate(entries)
                       if any(predicted[a][i] != e.labels[a] and e.labels[a] != UNKNOWN.get(a) for a in ATTRIBUTES)]
    return result
