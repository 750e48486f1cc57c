"""JSONL training data: read and check a file of examples in one of the three formats fine-tuning tools use.

- `{"text": ...}`: plain text; every token is trained on.
- `{"prompt": ..., "completion": ...}`: the loss falls on the completion.
- `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation; the loss falls on assistant messages.

The format is detected from the file's first example, and every other line must have the same shape: a file
that mixes formats is refused at the first line that differs. Other fields of a line are ignored (datasets
often carry ids or metadata). Blank lines are skipped. Every problem is a one-line `SctError` that starts
with `FILE:LINE:`. Turning records into tokens and loss masks is `sct_edge.train.examples`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sct_edge.errors import SctError

TEXT, COMPLETION, CHAT = "text", "completion", "chat"
# The fields that make a line one format or another, checked in this order (a line with "messages" is a
# conversation whatever else it holds).
FORMAT_FIELDS = {CHAT: ("messages",), COMPLETION: ("prompt", "completion"), TEXT: ("text",)}
ROLES = ("system", "user", "assistant", "tool")
JSONL_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class Record:
    """One example as written in the file. `where` is "FILE:LINE", for errors and for the validation split.

    Exactly the fields of its format are set: `text`; `prompt` and `completion`; or `messages` (each a
    {"role", "content"} dict of strings)."""

    where: str
    format: str
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: tuple[dict[str, str], ...] | None = None


def is_jsonl(path: Path) -> bool:
    """Whether `path` is read as JSONL examples (by its suffix) rather than as plain text."""
    return Path(path).suffix.lower() == JSONL_SUFFIX


def _line_format(obj: dict) -> str | None:
    for fmt, fields in FORMAT_FIELDS.items():
        if any(name in obj for name in fields):
            return fmt
    return None


def _string(obj: dict, name: str, where: str) -> str:
    if name not in obj:
        raise SctError(f"{where}: missing field '{name}'")
    value = obj[name]
    if not isinstance(value, str):
        raise SctError(f"{where}: field '{name}' must be a string, not {type(value).__name__}")
    return value


def _messages(obj: dict, where: str) -> tuple[dict[str, str], ...]:
    messages = obj["messages"]
    if not isinstance(messages, list) or not messages:
        raise SctError(f"{where}: field 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects")
    checked = []
    for number, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            raise SctError(f"{where}: message {number} is not an object")
        role = _string(message, "role", f"{where}: message {number}")
        if role not in ROLES:
            raise SctError(f"{where}: message {number} has unknown role '{role}' (known: {', '.join(ROLES)})")
        checked.append({"role": role, "content": _string(message, "content", f"{where}: message {number}")})
    return tuple(checked)


def _record(obj: dict, fmt: str, where: str) -> Record:
    if fmt == TEXT:
        return Record(where, fmt, text=_string(obj, "text", where))
    if fmt == COMPLETION:
        return Record(where, fmt, prompt=_string(obj, "prompt", where), completion=_string(obj, "completion", where))
    return Record(where, fmt, messages=_messages(obj, where))


def read_jsonl(path: Path) -> tuple[str, list[Record]]:
    """The file's format ("text", "completion" or "chat") and its records, in file order."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise SctError(f"{path}: cannot read ({error.strerror})") from None
    fmt: str | None = None
    first_line = 0
    records: list[Record] = []
    for number, line in enumerate(raw.split(b"\n"), 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except UnicodeDecodeError:
            raise SctError(f"{where}: not UTF-8 text") from None
        except json.JSONDecodeError as error:
            raise SctError(f"{where}: invalid JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(obj, dict):
            raise SctError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        line_format = _line_format(obj)
        if line_format is None:
            needed = "'text', 'prompt' and 'completion', or 'messages'" if fmt is None else \
                " and ".join(f"'{name}'" for name in FORMAT_FIELDS[fmt])
            raise SctError(f"{where}: missing field: an example needs {needed}")
        if fmt is None:
            fmt, first_line = line_format, number
        elif line_format != fmt:
            raise SctError(f"{where}: a {line_format} example, but the file's first example (line {first_line}) is "
                           f"{fmt}; a file must hold one format")
        records.append(_record(obj, fmt, where))
    if fmt is None:
        raise SctError(f"{path}: the file is empty (no examples)")
    return fmt, records
