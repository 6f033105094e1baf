"""The preference record (ARCHITECTURE.md section 3) and JSON-lines reading that loses nothing.

One JSON object per line, UTF-8. A line that cannot be read as a record is never dropped:
`read_jsonl` returns it as a `BadLine` with its line number and reason, and the caller sets it
aside in a quarantine file.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

SOURCES_FIXED = {"simulated", "prefect-ui"}  # plus "import:<format>"
SOURCE_PATTERN = r"^(simulated|prefect-ui|import:[a-z0-9-]+)$"  # the data contract's `source` values
LABELS = {"pair", "tie", "skip"}  # ties and skips are kept in the raw labels but are not pairs
UTF8_BOM = b"\xef\xbb\xbf"  # what Excel and Windows tools put before UTF-8 text


def record_id(prompt: str, chosen: str, rejected: str) -> str:
    """Stable id: a hash of the three texts (NUL-separated so the split is unambiguous)."""
    return hashlib.sha256(f"{prompt}\0{chosen}\0{rejected}".encode()).hexdigest()[:16]


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class PreferenceRecord:
    prompt: str
    chosen: str  # the preferred response (for a tie or skip: response A)
    rejected: str  # the other response (for a tie or skip: response B)
    source: str  # "simulated", "prefect-ui" or "import:<format>"
    annotator: str
    round: int
    policy_version: str | None = None  # registry version that produced the responses, if any
    created_at: str = field(default_factory=utc_now)  # ISO-8601 UTC
    label: str = "pair"  # "pair", "tie" or "skip"
    margin: float | None = None
    comment: str | None = None  # the annotator's note, if any
    shown_as_a: str | None = None  # which response a person saw first ("chosen" or "rejected"), if recorded
    id: str = ""
    line: int | None = field(default=None, compare=False, repr=False)  # where an import read it (not written out)

    def __post_init__(self):
        if not self.id:
            self.id = record_id(self.prompt, self.chosen, self.rejected)

    def to_json(self) -> str:
        d = asdict(self)
        del d["line"]
        for optional in ("margin", "comment", "shown_as_a"):
            if d[optional] is None:
                del d[optional]
        return json.dumps(d, ensure_ascii=False)


@dataclass
class BadLine:
    line: int  # 1-based line number in the source file
    reason: str
    raw: str  # the line as received (decoded with replacement characters if it was not UTF-8)


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict] | BadLine]:
    """Yield (line number, JSON object) per line, or a BadLine saying why it is not one. Streams the
    file; a UTF-8 byte order mark before the first line is not part of it."""
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            if n == 1:
                raw = raw.removeprefix(UTF8_BOM)
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield BadLine(n, f"not UTF-8 ({e.reason} at byte {e.start})", raw.decode("utf-8", "replace"))
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                yield BadLine(n, f"not JSON ({e.msg})", text.rstrip("\n"))
                continue
            if not isinstance(obj, dict):
                yield BadLine(n, f"not a JSON object (a {type(obj).__name__})", text.rstrip("\n"))
                continue
            yield n, obj


def write_jsonl_atomic(path: str | Path, lines: Iterable[str]) -> int:
    """Write lines to a temporary file beside `path`, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(line.rstrip("\n") + "\n")
            n += 1
    os.replace(tmp, path)
    return n
