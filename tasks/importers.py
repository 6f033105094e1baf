"""Importing preference files: our records, HH-RLHF dialogues, CSV and Parquet with a column map.

Each reader streams its file and yields, per source row, either a PreferenceRecord or a
BadLine (row number + reason). `import_file` writes the kept records to a new immutable raw
file, the set-aside rows to a quarantine file beside it, keeps the received file as it came,
and versions all three with DVC. Nothing is dropped without a line saying why.

Files come as tools write them: with a UTF-8 byte order mark (Excel), CSV separated by commas,
tabs, semicolons (Excel where the decimal mark is a comma) or bars, gzip-, bzip2- or xz-compressed
(`train.jsonl.gz`, as HH-RLHF is published).
"""
from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import json
import lzma
import math
import re
import shutil
import tempfile
from collections import Counter
from contextlib import contextmanager
from functools import lru_cache
from itertools import islice
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from tasks import versioning
from tasks.config import hh_turns, joined_turns
from tasks.records import SOURCE_PATTERN, UTF8_BOM, BadLine, PreferenceRecord, read_jsonl, utc_now
from tasks.workspace import Workspace

FORMATS = ("jsonl", "conversational", "csv", "parquet", "hh-rlhf", "label-studio", "argilla")
ASSISTANT = "\n\nAssistant:"
MAX_FIELD_CHARS = 100_000  # a field longer than this is a broken export, not a response
CSV_FIELD_LIMIT = 64 << 20  # Python's csv stops a whole file at a 128 KiB field; ours sets the row aside
CSV_DELIMITERS = ",\t;|"
csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))  # process-wide, and only ever raised
Row = PreferenceRecord | BadLine


class ImportError_(ValueError):
    """The file cannot be imported at all (unknown format, unreadable); the message says why."""


@dataclass
class ImportSummary:
    source_file: str
    format: str
    kept: int = 0
    set_aside: int = 0
    reasons: Counter = field(default_factory=Counter)
    raw_file: str | None = None
    quarantine_file: str | None = None
    received_file: str | None = None
    dialogues: int = 0  # kept records whose prompt is a dialogue (several turns, or a system turn)
    run_together: int = 0  # kept records whose prompt and a response meet with no whitespace between them
    push_error: str | None = None  # why the files were not pushed to the DVC remote (committed all the same)
    map_not_applied: str | None = None  # why the inbox's map was not applied (a format naming its own fields)
    examples: list[dict] | None = None  # a dry run's first kept records, as the import would write them
    set_aside_examples: list[dict] | None = None  # a dry run's first rows set aside: line and reasons

    def as_dict(self) -> dict:
        out = {"source_file": self.source_file, "format": self.format, "kept": self.kept,
               "set_aside": self.set_aside, "reasons": dict(self.reasons), "dialogues": self.dialogues,
               "run_together": self.run_together, "raw_file": self.raw_file,
               "quarantine_file": self.quarantine_file, "received_file": self.received_file,
               "pushed": self.push_error is None, "push_error": self.push_error,
               "map_not_applied": self.map_not_applied}
        if self.examples is not None:
            out |= {"dry_run": True, "pushed": False, "examples": self.examples,
                    "set_aside_examples": self.set_aside_examples}
        return out


# ---- checks shared by every format --------------------------------------------------------------
def _text_problem(name: str, value) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return f"missing or empty field '{name}'"
    if not isinstance(value, str):
        return f"field '{name}' is not text"
    if len(value) > MAX_FIELD_CHARS:
        return f"field '{name}' longer than {MAX_FIELD_CHARS} characters"
    if "\x00" in value:
        return f"field '{name}' holds NUL characters"
    return None


def _source(given, importer: str) -> str:
    """The file's own `source` when it is one of the contract's (our exports round-trip), else the
    importer's `import:<format>`: another tool's value would only get every row set aside later."""
    return given if isinstance(given, str) and re.fullmatch(SOURCE_PATTERN, given) else importer


def make_record(line: int, data: dict, source: str, round_: int) -> Row:
    """A record from a dict holding at least prompt/chosen/rejected (as text, or as conversations:
    see `from_conversation`), or a BadLine naming the problem."""
    if holds_messages(data):
        texts = from_conversation(data.get("prompt"), data.get("chosen"), data.get("rejected"))
        if isinstance(texts, str):
            return BadLine(line, texts, json.dumps(data, ensure_ascii=False, default=str)[:2000])
        data = {**data, **texts}
    if "_choice_problem" in data:
        return BadLine(line, data.pop("_choice_problem"), json.dumps(data, ensure_ascii=False, default=str)[:2000])
    problems = [p for p in (_text_problem(k, data.get(k)) for k in ("prompt", "chosen", "rejected")) if p]
    margin = data.get("margin")
    if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))
                               or not math.isfinite(margin)):
        problems.append("field 'margin' is not a finite number")
    label = data.get("label", "pair")
    if label not in ("pair", "tie", "skip"):
        problems.append(f"field 'label' is {label!r}, not pair, tie or skip")
    if problems:
        return BadLine(line, "; ".join(problems), json.dumps(data, ensure_ascii=False, default=str)[:2000])
    return PreferenceRecord(
        prompt=data["prompt"], chosen=data["chosen"], rejected=data["rejected"],
        source=_source(data.get("source"), source), annotator=str(data.get("annotator") or "unknown"),
        round=int(data["round"]) if isinstance(data.get("round"), int) else round_,
        policy_version=data.get("policy_version"), created_at=str(data.get("created_at") or utc_now()),
        label=label, margin=margin, id=str(data.get("id") or ""), line=line)


# ---- conversations: TRL's conversational preference format, ShareGPT's messages ------------------
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "model": "assistant",
         "system": "system"}


@dataclass(frozen=True)
class Problem:
    """Why a field or a conversation cannot be part of a record (returned where success is text too)."""
    reason: str


def holds_messages(row: dict) -> bool:
    """Whether any of prompt, chosen, rejected is written as messages (a list or an object), not text."""
    return any(isinstance(row.get(k), (list, dict)) for k in ("prompt", "chosen", "rejected"))


def messages_of(name: str, value) -> list[tuple[str, str]] | Problem:
    """A field holding messages ({"role", "content"}, or ShareGPT's {"from", "value"}; content as
    text or as text parts) as (role, text) pairs, or a Problem saying why it is not such a field."""
    if isinstance(value, dict):  # one message written as an object
        value = [value]
    if isinstance(value, str):
        return Problem(f"field '{name}' is text where another of prompt, chosen, rejected is a list of messages")
    if not isinstance(value, list) or not value:
        return Problem(f"field '{name}' is not a list of messages")
    messages = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            return Problem(f"message {i} of '{name}' is not an object with a role and a content")
        role, content = m.get("role", m.get("from")), m.get("content", m.get("value"))
        if role not in ROLES:
            return Problem(f"message {i} of '{name}' has role {role!r}, not user, assistant or system")
        if isinstance(content, list):  # content parts: text parts are joined; anything else (images) is not ours
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                return Problem(f"message {i} of '{name}' has a content part that is not text")
            content = "".join(p["text"] for p in content)
        problem = _text_problem(f"{name}[{i}].content", content)
        if problem:
            return Problem(problem)
        messages.append((ROLES[role], content))
    return messages


def from_conversation(prompt, chosen, rejected) -> dict[str, str] | str:
    """TRL's conversational preference row as our record's texts, or the reason it cannot be one.

    Three layouts: `prompt` a list of messages and `chosen`/`rejected` the assistant's reply each
    (explicit prompt; a reply may repeat the prompt's messages in front); `chosen`/`rejected` whole
    conversations sharing every turn but the last reply (implicit prompt, as in
    trl-lib/hh-rlhf-helpful-base); the latter with `prompt` as text, which must be the last user
    message (UltraFeedback binarized) or, with bare replies, is the user message. The replies become
    `chosen` and `rejected` as written. The shared turns become `prompt`: one user message as its
    text; anything more (earlier turns, a system message) as a dialogue in HH-RLHF's form
    ('\n\nSystem: s\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:'), which
    `chat.hh_dialogue` renders back into those turns.
    """
    sides = {"chosen": messages_of("chosen", chosen), "rejected": messages_of("rejected", rejected)}
    for messages in sides.values():
        if isinstance(messages, Problem):
            return messages.reason
    if isinstance(prompt, (list, dict)):  # explicit: the shared turns are the prompt's
        shared = messages_of("prompt", prompt)
        if isinstance(shared, Problem):
            return shared.reason
        tails = {side: tail[len(shared):] if tail[:len(shared)] == shared and len(tail) > len(shared) else tail
                 for side, tail in sides.items()}
    else:  # implicit: the shared turns are the conversations' common start
        c, r = sides["chosen"], sides["rejected"]
        if c == r:
            return "'chosen' and 'rejected' are the same conversation"
        n = 0
        while n < min(len(c), len(r)) - 1 and c[n] == r[n]:
            n += 1
        shared, tails = c[:n], {"chosen": c[n:], "rejected": r[n:]}
        if not shared and isinstance(prompt, str):  # the prompt as text, the replies as messages
            shared = [("user", prompt)]
    for side, tail in tails.items():
        if len(tail) != 1 or tail[0][0] != "assistant":
            return (f"'{side}' does not end in one assistant reply after the turns it shares with the other side "
                    f"({len(tail)} messages after them: {', '.join(role for role, _ in tail)})")
    if isinstance(prompt, str) and shared and shared[-1] != ("user", prompt):
        return "field 'prompt' is not the conversation's last user message"
    text = as_prompt(shared)
    if isinstance(text, Problem):
        return text.reason
    return {"prompt": text, "chosen": tails["chosen"][0][1], "rejected": tails["rejected"][0][1]}


def as_prompt(turns: list[tuple[str, str]]) -> str | Problem:
    """The turns before a reply as a prompt's text: one user message as itself; anything more
    (earlier turns, a system message first) as an HH-RLHF dialogue that `hh_turns` (and so
    `chat.hh_dialogue`) reads back as those turns. A Problem says why the turns cannot be one."""
    if any(role == "system" for role, _ in turns[1:]):
        return Problem("a system message after the first turn")
    if not turns or turns[-1][0] != "user":
        return Problem("the turns before the reply do not end with a user message")
    if len(turns) == 1:
        return turns[0][1]
    speaker = {"system": "System", "user": "Human", "assistant": "Assistant"}
    dialogue = "".join(f"\n\n{speaker[role]}: {text}" for role, text in turns) + "\n\nAssistant:"
    if hh_turns(dialogue) != joined_turns(turns):  # as chat.hh_dialogue will read it
        return Problem("the turns cannot be written as a dialogue that reads back the same: it must open with a user "
                       "message (after the system message, if any), and no message may hold '\\n\\nHuman:' or "
                       "'\\n\\nAssistant:'")
    return dialogue


# ---- readers ---------------------------------------------------------------------------------
def read_records_jsonl(path: Path, mapping: dict, round_: int) -> Iterator[Row]:
    for item in read_objects(path):
        if isinstance(item, BadLine):
            yield item
            continue
        line, obj = item
        yield make_record(line, _mapped(obj, mapping), "import:jsonl", round_)


def read_conversational(path: Path, mapping: dict, round_: int) -> Iterator[Row]:
    """JSON lines whose `chosen` and `rejected` are conversations (see `from_conversation`)."""
    for item in read_objects(path):
        if isinstance(item, BadLine):
            yield item
            continue
        line, obj = item
        row = _mapped(obj, mapping)
        if not holds_messages(row):
            yield BadLine(line, "not a conversation: no field holds messages (text rows are --format jsonl)",
                          json.dumps(obj, ensure_ascii=False)[:2000])
            continue
        yield make_record(line, row, "import:conversational", round_)


def split_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | str:
    """HH-RLHF: the prompt is the shared dialogue up to the last Assistant turn. Returns
    (prompt, chosen response, rejected response), or the reason it cannot be split."""
    cut = chosen.rfind(ASSISTANT)
    if cut < 0:
        return "no '\\n\\nAssistant:' turn in 'chosen'"
    prompt = chosen[:cut + len(ASSISTANT)]
    if not rejected.startswith(prompt):
        # the rejected side may end its dialogue earlier: use the common prefix's last Assistant turn
        common = 0
        while common < min(len(chosen), len(rejected)) and chosen[common] == rejected[common]:
            common += 1
        cut = chosen[:common].rfind(ASSISTANT)
        if cut < 0:
            return "'chosen' and 'rejected' share no dialogue up to an Assistant turn"
        prompt = chosen[:cut + len(ASSISTANT)]
    return prompt, chosen[len(prompt):], rejected[len(prompt):]


def read_hh_rlhf(path: Path, mapping: dict, round_: int) -> Iterator[Row]:
    for item in read_objects(path):
        if isinstance(item, BadLine):
            yield item
            continue
        line, obj = item
        fields = (mapping.get("chosen", "chosen"), mapping.get("rejected", "rejected"))
        problems = [p for p in (_text_problem(k, obj.get(k)) for k in fields) if p]
        if problems:
            yield BadLine(line, "; ".join(problems), json.dumps(obj, ensure_ascii=False, default=str)[:2000])
            continue
        split = split_dialogue(obj[fields[0]], obj[fields[1]])
        if isinstance(split, str):
            yield BadLine(line, split, json.dumps(obj, ensure_ascii=False)[:2000])
            continue
        prompt, chosen, rejected = split
        yield make_record(line, {"prompt": prompt, "chosen": chosen, "rejected": rejected,
                                 "annotator": "hh-rlhf"}, "import:hh-rlhf", round_)


def read_csv(path: Path, mapping: dict, round_: int) -> Iterator[Row]:
    """Rows of a CSV file with a header line; the separator is the header's (see `csv_delimiter`).
    A row that is not UTF-8 is set aside, as a JSON line would be; a header that is not stops the file.
    Row numbers are the line a row starts on (a quoted response may span lines)."""
    try:
        # surrogateescape: a byte that is not UTF-8 reaches the row as a lone surrogate, found below
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            header = f.readline()
            f.seek(0)
            reader = csv.DictReader(f, delimiter=csv_delimiter(path, header))
            columns = reader.fieldnames or []
            if not _is_utf8(*columns):
                raise ImportError_(f"{path}: its header line is not UTF-8 text; re-export the file as UTF-8")
            _check_columns(columns, mapping)
            start = reader.line_num + 1
            for row in reader:
                n, start = start, reader.line_num + 1
                cells = [v for k, v in row.items() if k is not None] + row.get(None, [])  # None: surplus cells
                if not _is_utf8(*(c for c in cells if isinstance(c, str))):  # a short row's missing cells are None
                    yield BadLine(n, "not UTF-8 text; re-export the file as UTF-8", _readable(row))
                elif None in row:
                    yield BadLine(n, f"{len(row[None])} more cells than the header has columns", _readable(row))
                else:
                    yield make_record(n, _mapped(row, mapping), "import:csv", round_)
    except csv.Error as e:
        raise ImportError_(f"{path} is not readable CSV: {e}") from None


def csv_delimiter(path: Path, header: str) -> str:
    """Tab for .tsv; else whichever of , tab ; | the header line holds most (a comma where it holds
    none: one column)."""
    if path.suffix.lower() == ".tsv":
        return "\t"
    counts = {d: header.count(d) for d in CSV_DELIMITERS}
    best = max(counts, key=counts.get)
    return best if counts[best] else ","


def _is_utf8(*texts: str) -> bool:
    """False where a text holds a byte decoded with surrogateescape (the file was not UTF-8 there)."""
    try:
        for text in texts:
            text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _readable(row: dict) -> str:
    """A CSV row for the quarantine file, its undecodable bytes as replacement characters."""
    def fix(v):
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "replace") if isinstance(v, str) else v
    return str({k: fix(v) for k, v in row.items()})[:2000]


def read_parquet(path: Path, mapping: dict, round_: int) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise ImportError_(f"{path} is not a Parquet file: {e}") from None
    schema = pf.schema_arrow
    side = mapping["a"] if "choice" in mapping else mapping.get("chosen", "chosen")  # a column of responses
    conversations = side in schema.names and (pa.types.is_list(schema.field(side).type)
                                              or pa.types.is_large_list(schema.field(side).type))
    _check_columns(schema.names, mapping, prompt_optional=conversations)
    n = 0
    for batch in pf.iter_batches(batch_size=8192):  # streams: memory does not grow with the file
        for row in batch.to_pylist():
            n += 1
            yield make_record(n, _mapped(row, mapping), "import:parquet", round_)


def read_label_studio(path: Path, mapping: dict, round_: int) -> Iterator[Row]:
    """A Label Studio pairwise export (JSON array of tasks; `data` holds prompt / answer1 / answer2,
    each annotation's `pairwise` result says left or right). One record per annotation; the row
    number is the task's position in the array."""
    keys = {"prompt": mapping.get("prompt", "prompt"), "a": mapping.get("chosen", "answer1"),
            "b": mapping.get("rejected", "answer2")}
    for n, task in enumerate(_json_array(path), start=1):
        if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
            yield BadLine(n, "task without a 'data' object", json.dumps(task, default=str)[:2000])
            continue
        data = task["data"]
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            yield BadLine(n, "task has no annotation", json.dumps(task, default=str)[:2000])
            continue
        for ann in annotations:
            picks = [r.get("value", {}).get("selected") for r in ann.get("result") or [] if r.get("type") == "pairwise"]
            if not picks or picks[0] not in ("left", "right"):
                yield BadLine(n, "annotation has no pairwise choice (left or right)", json.dumps(ann, default=str)[:2000])
                continue
            a, b = data.get(keys["a"]), data.get(keys["b"])
            chosen, rejected = (a, b) if picks[0] == "left" else (b, a)
            yield make_record(n, {"prompt": data.get(keys["prompt"]), "chosen": chosen, "rejected": rejected,
                                  "annotator": f"label-studio:{ann.get('completed_by', 'unknown')}",
                                  "created_at": ann.get("created_at")}, "import:label-studio", round_)


def read_argilla(path: Path, mapping: dict, round_: int) -> Iterator[Row]:
    """An Argilla ranking export (JSON lines or a JSON array of records with `fields` and
    `responses`; each submitted response ranks the candidate fields). The best-ranked response is
    chosen against each lower-ranked one; equal ranks are a tie."""
    prompt_key = mapping.get("prompt", "prompt")
    for item in read_objects(path):
        if isinstance(item, BadLine):
            yield item
            continue
        n, rec = item
        fields = rec.get("fields")
        if not isinstance(fields, dict):
            yield BadLine(n, "record without a 'fields' object", json.dumps(rec, default=str)[:2000])
            continue
        submitted = [r for r in rec.get("responses") or [] if r.get("status", "submitted") == "submitted"]
        if not submitted:
            yield BadLine(n, "record has no submitted response", json.dumps(rec, default=str)[:2000])
            continue
        for resp in submitted:
            ranking = next((v.get("value") for v in (resp.get("values") or {}).values()
                            if isinstance(v.get("value"), list)), None)
            if not ranking or len(ranking) < 2 or not all(isinstance(r, dict) and "rank" in r for r in ranking):
                yield BadLine(n, "response has no ranking of two or more fields", json.dumps(resp, default=str)[:2000])
                continue
            ranked = sorted(ranking, key=lambda r: r["rank"])
            best = ranked[0]
            for other in ranked[1:]:
                yield make_record(n, {"prompt": fields.get(prompt_key), "chosen": fields.get(best["value"]),
                                      "rejected": fields.get(other["value"]),
                                      "label": "tie" if other["rank"] == best["rank"] else "pair",
                                      "annotator": f"argilla:{resp.get('user_id', 'unknown')}"},
                                  "import:argilla", round_)


def read_objects(path: Path) -> Iterator[tuple[int, dict] | BadLine]:
    """(row, object) per JSON line, or per item of a JSON array (what `json.dump` of a list and
    `DataFrame.to_json(orient="records")` write; the row is the item's position from 1), or a
    BadLine where a row is not a JSON object."""
    if not is_json_array(path):
        yield from read_jsonl(path)
        return
    for n, obj in enumerate(_json_array(path), start=1):
        if isinstance(obj, dict):
            yield n, obj
        else:
            yield BadLine(n, f"not a JSON object (a {type(obj).__name__})",
                          json.dumps(obj, ensure_ascii=False, default=str)[:2000])


def is_json_array(path: Path) -> bool:
    """Whether the file holds one JSON array (its first character past a byte order mark and blanks is '[')."""
    return _head(path).lstrip()[:1] == b"["


def _head(path: Path) -> bytes:
    """The file's first 64 KiB, without a UTF-8 byte order mark."""
    with open(path, "rb") as f:
        return f.read(1 << 16).removeprefix(UTF8_BOM)


def _first_item(head: bytes):
    """The first item of the JSON array a file's head starts, parsed from the head alone (the
    reader parses the whole file once: a large export is not parsed twice); None where the item
    does not end within the head or is not JSON."""
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end waits
        return json.JSONDecoder().raw_decode(text.lstrip()[1:].lstrip())[0]  # past '[' and blanks
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None


def _json_array(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ImportError_(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ImportError_(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise ImportError_(f"{path} must hold a JSON array of tasks/records, got a {type(data).__name__}")
    return data


def _mapped(row: dict, mapping: dict) -> dict:
    """The row with our field names; with a=,b=,choice= the winner's columns become chosen and
    rejected (`from_choice`), or the row carries why they cannot (`_choice_problem`)."""
    if "choice" not in mapping:
        return {**row, **{ours: row.get(theirs) for ours, theirs in mapping.items()}}
    picked = from_choice(row.get(mapping["a"]), row.get(mapping["b"]), row.get(mapping["choice"]), mapping["choice"],
                         choice_values(mapping))
    out = {**row, **{ours: row.get(theirs) for ours, theirs in mapping.items() if ours in ("prompt", "annotator")}}
    return out | ({"_choice_problem": picked} if isinstance(picked, str) else picked)


CHOICES = {"a": ("a", "1"), "b": ("b", "2"), "tie": ("tie",), "skip": ("skip",)}  # what a choice reads by default


def choice_values(mapping: dict) -> dict[str, str]:
    """The choice column's values -> a, b, tie or skip: the defaults, each of a, b, tie, skip
    replaced where the map gives its own (`choice_b=0`: SHP's labels, 1 for A and 0 for B;
    `choice_a=0,choice_b=1`: PKU-SafeRLHF's better_response_id; `|` between several). Read for
    every row: made once per map (do not change the table it returns)."""
    return _choice_table(tuple(mapping.get(f"choice_{pick}") for pick in CHOICES))


@lru_cache(maxsize=16)
def _choice_table(given: tuple[str | None, ...]) -> dict[str, str]:
    values = {value: pick for (pick, default), mine in zip(CHOICES.items(), given) if mine is None for value in default}
    for pick, mine in zip(CHOICES, given):  # yours over the defaults: choice_a=2 alone makes 2 mean a
        if mine is not None:
            values |= {value.strip().lower(): pick for value in mine.split("|")}
    return values


def _choice_text(value) -> str | None:
    """A choice cell as the text it is compared as; 1.0 (a column of numbers) reads as 1."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip().lower() if isinstance(value, (str, int)) and not isinstance(value, bool) else None


def from_choice(a, b, choice, column: str = "choice", values: dict[str, str] | None = None) -> dict | str:
    """Two responses and which one won -> chosen / rejected / label, or why not. `values` (from
    `choice_values`) reads the choice, in any case; a tie or skip keeps a as chosen."""
    values = values or choice_values({})
    pick = values.get(_choice_text(choice))
    if pick is None:
        accepted = ", ".join(f"{'/'.join(v for v, p in values.items() if p == pick)} ({pick})" for pick in CHOICES)
        return f"'{column}' is {choice!r}, not one of {accepted}"
    chosen, rejected = (b, a) if pick == "b" else (a, b)
    return {"chosen": chosen, "rejected": rejected, "label": "pair" if pick in ("a", "b") else pick}


def _check_columns(columns: list[str], mapping: dict, prompt_optional: bool = False) -> None:
    """The prompt column may be missing where chosen holds whole conversations (implicit prompt)."""
    ours = ("prompt", "a", "b", "choice") if "choice" in mapping else ("prompt", "chosen", "rejected")
    ours += ("annotator",) if "annotator" in mapping else ()
    needed = {k: mapping.get(k, k) for k in ours if k != "prompt" or not prompt_optional}
    missing = [f"{theirs}" + (f" (for {ours})" if ours != theirs else "")
               for ours, theirs in needed.items() if theirs not in columns]
    if missing:
        raise ImportError_(f"columns {', '.join(missing)} not found; the file has {', '.join(columns) or 'none'}. "
                           f"Map yours with --map {MAP_USAGE}")


READERS: dict[str, Callable[[Path, dict, int], Iterator[Row]]] = {
    "jsonl": read_records_jsonl, "conversational": read_conversational, "hh-rlhf": read_hh_rlhf, "csv": read_csv,
    "parquet": read_parquet, "label-studio": read_label_studio, "argilla": read_argilla}


def detect_format(path: Path, mapping: dict | None = None) -> str:
    """By extension, then (JSON lines or a JSON array) by the keys of the first object, read
    through `mapping` (--map) where one is given."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".csv", ".tsv"):
        return "csv"
    head = _head(path)
    if not head.strip():
        raise ImportError_(f"{path} is empty: nothing to import")
    if head.lstrip()[:1] == b"[":  # is_json_array: Label Studio tasks, or records as JSON lines hold them
        first = _first_item(head)
        if not isinstance(first, dict):  # not within the head, or not an object: the whole array
            try:
                items = _json_array(path)
            except ImportError_ as e:
                raise ImportError_(f"{e}; if it is JSON lines, pass --format") from None
            first = next((item for item in items if isinstance(item, dict)), None)
        if first is None:
            raise ImportError_(f"{path}: a JSON array with no object in it: nothing to import")
        if "annotations" in first and "data" in first:
            return "label-studio"
        return _format_of_object(path, first, mapping or {})
    first_bad = None
    for item in read_jsonl(path):
        if isinstance(item, BadLine):
            first_bad = first_bad or item
            continue
        return _format_of_object(path, item[1], mapping or {})
    if b"\x00" in head:
        raise ImportError_(f"{path} looks binary, not a JSON-lines, CSV or Parquet file")
    raise ImportError_(f"{path}: no line of it is a JSON object (line {first_bad.line}: {first_bad.reason}); "
                       "pass --format")


def _format_of_object(path: Path, obj: dict, mapping: dict) -> str:
    if "choice" in mapping and all(mapping[k] in obj for k in ("a", "b", "choice")):
        return "jsonl"
    obj = {**obj, **{ours: obj[theirs] for ours, theirs in mapping.items() if theirs in obj}}
    keys = set(obj)
    if {"chosen", "rejected"} <= keys and isinstance(obj["chosen"], (list, dict)):
        return "conversational"
    if {"prompt", "chosen", "rejected"} <= keys:
        return "jsonl"
    if {"chosen", "rejected"} <= keys and ASSISTANT in str(obj.get("chosen")):
        return "hh-rlhf"
    if {"fields", "responses"} <= keys:
        return "argilla"
    raise ImportError_(f"{path}: cannot tell the format from keys {sorted(keys)}; pass --format")


MAP_USAGE = ("prompt=COL,chosen=COL,rejected=COL, or prompt=COL,a=COL,b=COL,choice=COL (a column saying which won; "
             "choice_a=, choice_b=, choice_tie=, choice_skip= give its values where they are not a/1, b/2, tie, skip); "
             "annotator=COL: who labelled the row")
MAP_KEYS = ("prompt", "chosen", "rejected", "a", "b", "choice", "choice_a", "choice_b", "choice_tie", "choice_skip",
            "annotator")
# The --map keys each format reads. HH-RLHF, Label Studio and Argilla name their own annotators;
# HH-RLHF's prompt is the dialogue up to its last Assistant turn, never a field of its own.
MAP_READ = {"jsonl": MAP_KEYS, "csv": MAP_KEYS, "parquet": MAP_KEYS,
            "conversational": ("prompt", "chosen", "rejected", "annotator"),
            "hh-rlhf": ("chosen", "rejected"),  # the fields of the two dialogues
            "label-studio": ("prompt", "chosen", "rejected"),  # data's prompt, answer1 and answer2 fields
            "argilla": ("prompt",)}  # the field of `fields` that holds the prompt
CHOICE_MAP_FORMATS = tuple(f for f in FORMATS if "choice" in MAP_READ[f])
ANNOTATOR_MAP_FORMATS = tuple(f for f in FORMATS if "annotator" in MAP_READ[f])
# datasets' and tools' own formats (HH-RLHF, Label Studio, Argilla): fields and annotators of their own
OWN_FIELDS_FORMATS = tuple(f for f in FORMATS if f not in ANNOTATOR_MAP_FORMATS)


def _map_text(mapping: dict) -> str:
    return ",".join(f"{ours}={theirs}" for ours, theirs in mapping.items())


def check_mapping(mapping: dict, fmt: str, path: Path) -> None:
    """A --map key the format does not read is refused, never ignored: a file read other than as
    its map says would import the wrong fields without a word."""
    unread = [k for k in mapping if k not in MAP_READ[fmt]]
    if "choice" in unread:
        raise ImportError_(f"--map a=,b=,choice= reads {', '.join(CHOICE_MAP_FORMATS)} files; {path} is {fmt}")
    if "annotator" in unread:
        raise ImportError_(f"--map annotator= reads {', '.join(ANNOTATOR_MAP_FORMATS)} files; {path} is {fmt}, "
                           "which names its annotators itself")
    if unread:
        raise ImportError_(f"--map {', '.join(k + '=' for k in unread)}: {path} is {fmt}, which has no such field "
                           f"to name; {fmt} files read {', '.join(k + '=' for k in MAP_READ[fmt])} from --map")


def parse_mapping(text: str | None) -> dict:
    """'prompt=question,chosen=good' -> {'prompt': 'question', 'chosen': 'good'}; or the two
    responses and the column that says which won: 'a=left,b=right,choice=winner'."""
    if not text:
        return {}
    mapping = {}
    for part in text.split(","):
        ours, sep, theirs = part.partition("=")
        if not sep or ours.strip() not in MAP_KEYS or not theirs.strip():
            raise ImportError_(f"bad --map entry {part!r}: expected {MAP_USAGE}")
        mapping[ours.strip()] = theirs.strip()
    ab = {"a", "b", "choice"} & set(mapping)
    if ab and ab != {"a", "b", "choice"}:
        raise ImportError_(f"--map {text!r}: a=, b= and choice= go together (the two responses and which won); "
                           f"missing {', '.join(sorted({'a', 'b', 'choice'} - ab))}")
    if ab and {"chosen", "rejected"} & set(mapping):
        raise ImportError_(f"--map {text!r}: either chosen= and rejected=, or a=, b= and choice=, not both")
    given = [k for k in mapping if k.startswith("choice_")]
    if given and "choice" not in mapping:
        raise ImportError_(f"--map {text!r}: {', '.join(g + '=' for g in given)} give the values of the choice "
                           "column: map it too (a=COL,b=COL,choice=COL)")
    meaning: dict[str, str] = {}
    for key in given:
        for value in (v.strip().lower() for v in mapping[key].split("|")):
            if meaning.setdefault(value, key) != key:
                raise ImportError_(f"--map {text!r}: the choice value {value!r} is given for both "
                                   f"{meaning[value]} and {key}")
    return mapping


def convert(path: Path, fmt: str, mapping: dict, round_: int, kept_out: Path, bad_out: Path,
            name: str | None = None, lines: list[int] | None = None) -> ImportSummary:
    """Stream `path` into kept records (JSON lines) and set-aside rows (JSON lines with reasons);
    `name`: the file's as received, where `path` is its decompressed copy; `lines`, where given,
    gets the line (or array position) in `path` of each kept record, in order."""
    summary = ImportSummary(source_file=str(path), format=fmt)
    seen: set[str] = set()
    with open(kept_out, "w", encoding="utf-8") as kept, open(bad_out, "w", encoding="utf-8") as bad:
        for row in READERS[fmt](path, mapping, round_):
            if isinstance(row, PreferenceRecord) and row.id in seen:
                row = BadLine(row.line or 0, "duplicate of an earlier pair in the file", row.to_json()[:2000])
            if isinstance(row, BadLine):
                summary.set_aside += 1
                summary.reasons[row.reason] += 1
                bad.write(json.dumps({"source_file": name or path.name, "line": row.line, "reasons": [row.reason],
                                      "record": row.raw}, ensure_ascii=False) + "\n")
                continue
            seen.add(row.id)
            if lines is not None:
                lines.append(row.line)
            summary.kept += 1
            summary.dialogues += hh_turns(row.prompt) is not None
            summary.run_together += not (separated(row.prompt, row.chosen) and separated(row.prompt, row.rejected))
            kept.write(row.to_json() + "\n")
    return summary


def run_together_note(summary: ImportSummary) -> str | None:
    """What to do about pairs a plain language model would read run together (say it where
    chat.template is false: a chat template keeps prompt and reply apart as turns)."""
    if not summary.run_together:
        return None
    return (f"in {summary.run_together} of the {summary.kept} kept pairs the prompt and a response meet with no "
            "space or newline between them: a plain language model reads the two run together (chat.template "
            "is false); start the responses with a space or newline, or with a chat model set chat.template: true")


def separated(prompt: str, response: str) -> bool:
    """Whether whitespace lies between a prompt and its response: a plain language model reads
    prompt + response as one text ("...said" + "they were" is "...saidthey were")."""
    return prompt[-1:].isspace() or response[:1].isspace()


COMPRESSED = {"gzip": gzip.open, "bzip2": bz2.open, "xz": lzma.open}
COMPRESSED_SUFFIXES = (".gz", ".gzip", ".bz2", ".xz")


def compression(path: Path) -> str | None:
    """'gzip', 'bzip2' or 'xz' by the file's first bytes, None for a plain file; an archive or a
    compression Python cannot read is refused, with how to unpack it."""
    with open(path, "rb") as f:
        magic = f.read(10)
    if magic.startswith(b"\x1f\x8b"):
        return "gzip"
    if magic[:3] == b"BZh" and magic[3:4].isdigit() and magic[4:10] == b"1AY&SY":
        return "bzip2"
    if magic.startswith(b"\xfd7zXZ\x00"):
        return "xz"
    if magic.startswith(b"\x28\xb5\x2f\xfd"):
        raise ImportError_(f"{path} is zstd-compressed: decompress it first (`zstd -d {path}`) and import that")
    if magic.startswith(b"PK\x03\x04"):
        raise ImportError_(f"{path} is a zip archive: unpack it and import the files inside")
    return None


@contextmanager
def decompressed(path: Path, scratch: Path | None = None) -> Iterator[Path]:
    """`path` itself, or for a gzip, bzip2 or xz file its contents, in a temporary file in `scratch`
    named without the compression suffix (train.jsonl.gz -> train.jsonl: the format is told as for
    the plain file). Errors about the copy name `path`."""
    kind = compression(path)
    if kind is None:
        yield path
        return
    inner = path.stem if path.suffix.lower() in COMPRESSED_SUFFIXES else path.name
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        out = Path(tmp) / inner
        try:
            with COMPRESSED[kind](path, "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ImportError_(f"{path} is {kind}-compressed but cannot be decompressed ({e or type(e).__name__}): "
                               "is the file whole?") from None
        try:
            yield out
        except ImportError_ as e:
            raise ImportError_(str(e).replace(str(out), f"{path} (decompressed)")) from None


DRY_RUN_EXAMPLES = 3  # kept records and rows set aside a dry run shows


def _first_lines(path: Path, n: int) -> list[dict]:
    """The first `n` lines of a JSON-lines file we wrote, parsed."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in islice(f, n)]


def import_file(ws: Workspace, path: Path, fmt: str = "auto", mapping: dict | None = None,
                round_: int | None = None, map_for_tables: bool = False, dry_run: bool = False) -> ImportSummary:
    """Import one file into the workspace's raw feedback, versioned with DVC. Returns the summary;
    the caller decides the exit code (see `failed`). A --map key the file's format does not read is
    refused; with `map_for_tables` (the inbox's one map for every file it is sent), a file of a
    format that names its own fields (HH-RLHF, Label Studio, Argilla) is read without the map, and
    the summary's `map_not_applied` says so. `dry_run`: the file is read and checked all the same,
    and nothing is written to the workspace (which need not exist); the summary's `examples` holds
    the first records the import would keep, to check a --map (which response became chosen)."""
    path = Path(path)
    if not path.is_file():
        raise ImportError_(f"{path} does not exist or is not a file")
    if fmt != "auto" and fmt not in READERS:
        raise ImportError_(f"unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    mapping = mapping or {}
    round_ = round_ if round_ is not None else ws.read_state().round
    scratch = None if dry_run else ws.root / ".cache"  # git-ignored scratch space on the same disk
    if scratch is not None:
        scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp, decompressed(path, Path(tmp)) as readable:
        fmt = detect_format(readable, mapping) if fmt == "auto" else fmt
        not_applied = None
        if mapping and map_for_tables and fmt in OWN_FIELDS_FORMATS:
            not_applied = f"{fmt} names its own fields: the map ({_map_text(mapping)}) is not applied to it"
            mapping = {}
        check_mapping(mapping, fmt, path)
        kept, bad = Path(tmp) / "kept.jsonl", Path(tmp) / "set-aside.jsonl"
        summary = convert(readable, fmt, mapping, round_, kept, bad, name=path.name)
        summary.map_not_applied = not_applied
        summary.source_file = str(path)
        if dry_run:
            summary.examples = _first_lines(kept, DRY_RUN_EXAMPLES)
            summary.set_aside_examples = [{"line": r["line"], "reasons": r["reasons"]}
                                          for r in _first_lines(bad, DRY_RUN_EXAMPLES)]
            return summary
        received_dir = ws.root / "data" / "feedback" / "received"
        md5 = versioning.file_md5(path)
        received = received_dir / f"{md5[:12]}-{path.name}"
        extra = []
        if not received.exists():  # the file as it came, byte for byte
            received_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, received)
        if not versioning.committed(ws, received):  # new, or left half done by an attempt that stopped
            extra.append(received)
        summary.received_file = str(received)
        if summary.set_aside:
            qdir = ws.root / "data" / "feedback" / "quarantine"
            quarantine = qdir / f"{received.stem}.set-aside.jsonl"
            if not quarantine.exists():  # same received bytes -> same set-aside rows
                qdir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(bad, quarantine)
            if not versioning.committed(ws, quarantine):
                extra.append(quarantine)
            summary.quarantine_file = str(quarantine)
        message = f"data: received {path.name} ({fmt}), {summary.set_aside} rows set aside"
        if summary.kept:  # the pairs, then the file as received and the rows set aside: one `dvc add`
            summary.raw_file = str(versioning.add_raw_feedback(ws, kept, round_, f"import-{fmt}", summary.kept,
                                                               digest=md5, also=(message, extra) if extra else None))
        elif extra:
            versioning.add_files(ws, extra, message)
        versioned = [Path(f) for f in (summary.raw_file, summary.received_file, summary.quarantine_file) if f]
        summary.push_error = versioning.push(ws, *versioned)
    return summary


MAX_BAD_FRACTION = 0.5  # a file with more rows set aside than this fails its import (`--max-bad-fraction`)


def failed(summary: ImportSummary, max_bad_fraction: float = MAX_BAD_FRACTION) -> str | None:
    """Why the import counts as failed (exit non-zero), or None."""
    total = summary.kept + summary.set_aside
    if summary.kept == 0:
        return "no usable pair in the file"
    if total and summary.set_aside / total > max_bad_fraction:
        return f"{summary.set_aside} of {total} rows set aside, more than --max-bad-fraction={max_bad_fraction}"
    return None
