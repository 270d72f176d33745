"""Streaming JSONL reader: one chat sample per line, validated, rejected rows named and counted.

A row is `{"messages": [{"role": ..., "content": ...}, ...], "domain": "law", "distilled": false}`;
roles are system, user and assistant. A training sample ends with a non-empty assistant turn and
has no empty assistant turn anywhere (an empty target would teach the model to stop at once). An
instruction (input of self-distillation) is the same without the final answer: it ends with a
user turn. `domain` is optional; where given it must be a domain of the role table and match the
source the file is listed under. Distilled exemplars (`"distilled": true`) belong to the general
domain only.

Two more readers: `read_tagged_samples` for a file holding several domains (data.files,
eval.files), where each row's own `domain` ("general" or a domain name) says where it belongs and
a row without one is rejected; and `read_pretrain` for base-model training data (data.pretrain),
where a row is a chat as above or `{"text": "..."}`, plain text trained on every token.

Under `bad_rows = "skip"` a rejected row is logged (the first few per file, with file:line and the
reason) and counted by reason in `RowStats`; under `"error"` it raises `DataError("path:line:
reason")`.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

from ..config import BAD_ROW_POLICIES
from ..errors import ConfigError, DataError
from ..kinds import GENERAL_DOMAIN
from ..log import get_logger

log = get_logger(__name__)

ROLES = ("system", "user", "assistant")
WARN_FIRST = 5      # rejected rows logged per file under "skip"; the rest are only counted


@dataclass(slots=True)   # not frozen: a frozen dataclass takes ~5x longer to build, per row
class Record:
    """One accepted row: messages hold only `role` and `content`. Treat it as read-only."""
    messages: tuple
    domain: str | None
    distilled: bool
    path: str
    line: int
    text: str | None = None     # a plain-text row of data.pretrain (then messages is empty)
    offset: int = -1            # where the row starts in its file (bytes), and its length:
    length: int = -1            # load_content() reads it again from there

    @property
    def origin(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass
class RowStats:
    """Counts over every file read: rows read (non-blank lines), blank lines, kept, rejected by
    reason."""
    files: dict = field(default_factory=dict)       # path -> {"read", "blank", "kept", "rejected"}
    rejected: Counter = field(default_factory=Counter)   # reason -> rows
    # domain -> rows rejected for naming it without a role prompt (a misspelt domain shows here)
    unknown_domains: Counter = field(default_factory=Counter)
    # domain -> rows rejected for naming it in a file listed under another domain
    mismatched_domains: Counter = field(default_factory=Counter)
    # reason -> ("path:line", detail) of its first rejected row, to show in a summary
    first: dict = field(default_factory=dict)
    # domain -> "path:line" of the first row rejected for it (unknown or mismatched)
    domain_origin: dict = field(default_factory=dict)

    def file(self, path: str) -> dict:
        return self.files.setdefault(path, {"read": 0, "blank": 0, "kept": 0, "rejected": 0})

    def as_dict(self) -> dict:
        return {"files": {p: dict(c) for p, c in self.files.items()},
                "rejected": dict(self.rejected)}


class _Reject(Exception):
    def __init__(self, reason: str, detail: str, domain: str | None = None):
        super().__init__(detail)
        self.reason, self.detail, self.domain = reason, detail, domain


def _check_messages(row: dict, *, instruction: bool) -> tuple:
    messages = row.get("messages")
    if messages is None:
        raise _Reject("missing messages", "no 'messages' field")
    if not isinstance(messages, list):
        raise _Reject("missing messages",
                      f"'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise _Reject("missing messages", "'messages' is empty")
    turns = []
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            raise _Reject("wrong type",
                          f"messages[{i}] must be an object, got {type(turn).__name__}")
        role, content = turn.get("role"), turn.get("content")
        if not isinstance(role, str):
            raise _Reject("wrong type",
                          f"messages[{i}].role must be a string, got {type(role).__name__}")
        if role not in ROLES:
            raise _Reject("unknown role",
                          f"messages[{i}].role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _Reject("wrong type",
                          f"messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "assistant" and not content.strip():
            raise _Reject("empty assistant turn", f"messages[{i}] is an empty assistant turn")
        turns.append({"role": role, "content": content})
    last = turns[-1]["role"]
    if instruction:
        if last != "user":
            raise _Reject("not an instruction",
                          f"the last turn is {last!r}; an instruction ends with the user turn to "
                          "answer")
    elif not any(t["role"] == "assistant" for t in turns):
        raise _Reject("missing assistant turn", "no assistant turn to learn from")
    elif last != "assistant":
        raise _Reject("missing assistant turn",
                      f"the last turn is {last!r}; a training sample ends with the assistant's")
    return tuple(turns)


def _check_text(row: dict) -> str:
    if "messages" in row:
        raise _Reject("wrong type",
                      "a row has either 'text' (plain text) or 'messages' (a chat), not both")
    text = row["text"]
    if not isinstance(text, str):
        raise _Reject("wrong type", f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise _Reject("empty text", "'text' is empty")
    return text


def _check_row(row, *, source: str | None, source_key: str, known_domains: Collection[str] | None,
               instruction: bool, text_rows: bool = False, text_only: bool = False) -> tuple:
    """(messages, domain, distilled, text) of a valid row. `source` None: the row's own domain
    decides (data.files); `text_rows`: {"text": ...} rows are accepted too (data.pretrain)."""
    if not isinstance(row, dict):
        raise _Reject("not an object", f"expected a JSON object, got {type(row).__name__}")
    if text_only and "text" not in row:
        raise _Reject("missing text", "no 'text' field: a row of a corpus is {\"text\": \"...\"}")
    text = _check_text(row) if text_rows and "text" in row else None
    if text_only:   # a corpus document: its domain is the corpus's
        return (), None, False, text
    messages = () if text is not None else _check_messages(row, instruction=instruction)
    distilled = row.get("distilled", False)
    if not isinstance(distilled, bool):
        raise _Reject("wrong type", f"'distilled' must be true or false, got {distilled!r}")
    domain = row.get("domain")
    if domain is None and source is None:
        raise _Reject("missing domain",
                      f"no 'domain' field: each row of {source_key} names its domain, "
                      f"e.g. \"domain\": \"{GENERAL_DOMAIN}\" or a domain of roles.prompts")
    if domain is not None:
        if not isinstance(domain, str):
            raise _Reject("wrong type", f"'domain' must be a string, got {type(domain).__name__}")
        if known_domains is not None and domain not in known_domains:
            raise _Reject("unknown domain", f"domain {domain!r} has no role prompt "
                          f"(known: {', '.join(known_domains)}); add roles.prompts.{domain} or fix "
                          "the row", domain)
        if source is not None and domain != source:
            section = source_key.split(".")[0]
            hint = (f"; a file holding several domains goes in {section}.files, where each row's "
                    "domain decides" if section in ("data",
                        "eval") and source_key != "data.pretrain" else "")
            raise _Reject("domain mismatch",
                          f"domain {domain!r} disagrees with the source this file is listed "
                          f"under ({source_key}){hint}", domain)
    if distilled and (domain if source is None else source) != GENERAL_DOMAIN:
        raise _Reject("domain mismatch", f"a distilled (general) exemplar listed under {source_key}"
                      + (f" with domain {domain!r}" if source is None else ""))
    return messages, domain, distilled, text


def _parse(raw: bytes):
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _Reject("bad JSON", f"not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise _Reject("bad JSON", f"invalid JSON: {e.msg} (column {e.colno})") from None


def _read(path, *, source: str | None, source_key: str, known_domains, instruction: bool,
          bad_rows: str,
          stats: RowStats | None, text_rows: bool = False,
          text_only: bool = False) -> Iterator[Record]:
    if bad_rows not in BAD_ROW_POLICIES:
        # An argument check for callers in code; a run's config is checked by validate_config.
        raise ConfigError(f"data.bad_rows = {bad_rows!r}: expected one of "
                          f"{', '.join(BAD_ROW_POLICIES)}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: file not found (listed as {source_key})", "file not found", path)
    stats = stats if stats is not None else RowStats()
    # Checked here, before the first row is asked for: a missing file fails when it is listed.
    return _rows(path, source, source_key, known_domains, instruction, bad_rows, stats, text_rows,
                 text_only)


def _rows(path, source, source_key, known_domains, instruction, bad_rows, stats,
          text_rows, text_only=False) -> Iterator[Record]:
    counts = stats.file(path)
    warned = 0
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            at, offset = offset, offset + len(raw)
            if not raw.strip():
                counts["blank"] += 1
                continue
            counts["read"] += 1
            try:
                messages, domain, distilled, text = _check_row(
                    _parse(raw), source=source, source_key=source_key, known_domains=known_domains,
                    instruction=instruction, text_rows=text_rows, text_only=text_only)
            except _Reject as r:
                if bad_rows == "error":
                    raise DataError(f"{path}:{line_no}: {r.detail}", r.reason, path,
                                    line_no) from None
                counts["rejected"] += 1
                stats.rejected[r.reason] += 1
                stats.first.setdefault(r.reason, (f"{path}:{line_no}", r.detail))
                if r.domain is not None:
                    (stats.unknown_domains if r.reason == "unknown domain"
                     else stats.mismatched_domains)[r.domain] += 1
                    stats.domain_origin.setdefault(r.domain, f"{path}:{line_no}")
                if warned < WARN_FIRST:
                    warned += 1
                    more = (" (further rejected rows of this file are only counted)"
                            if warned == WARN_FIRST else "")
                    log.warning("%s:%d: %s; row skipped%s", path, line_no, r.detail, more)
                continue
            counts["kept"] += 1
            yield Record(messages, domain, distilled, path, line_no, text, at, len(raw))


def read_samples(path, *, source: str, known_domains: Collection[str] | None = None,
                 bad_rows: str = "skip", stats: RowStats | None = None,
                 source_key: str = "") -> Iterator[Record]:
    """Training samples of `path`, listed under `source` ("general" or a domain name).

    `known_domains` (the role table's, general included) rejects rows naming another domain;
    `source_key` is the config key quoted in errors (default `data.domains.<source>` or
    `data.general`). Counts go to `stats` when given.
    """
    key = source_key or ("data.general" if source == GENERAL_DOMAIN else f"data.domains.{source}")
    return _read(path, source=source, source_key=key, known_domains=known_domains,
                 instruction=False, bad_rows=bad_rows, stats=stats)


def read_tagged_samples(path, *, source_key: str, known_domains: Collection[str] | None = None,
                        bad_rows: str = "skip", stats: RowStats | None = None) -> Iterator[Record]:
    """Training samples of a file holding several domains (data.files, eval.files, named by
    `source_key`): each row's `domain` ("general" or a domain of `known_domains`) is where it
    belongs, in Record.domain; a row without one is rejected ("missing domain")."""
    return _read(path, source=None, source_key=source_key, known_domains=known_domains,
                 instruction=False, bad_rows=bad_rows, stats=stats)


def read_pretrain(path, *, bad_rows: str = "skip", stats: RowStats | None = None,
                  source_key: str = "data.pretrain") -> Iterator[Record]:
    """Base-model training data: chats (as read_samples, general domain) or {"text": "..."} rows
    (Record.text set, messages empty), trained on every token."""
    return _read(path, source=GENERAL_DOMAIN, source_key=source_key, known_domains=None,
                 instruction=False, bad_rows=bad_rows, stats=stats, text_rows=True)


def read_documents(path, *, source_key: str, txt_documents: str = "file", bad_rows: str = "skip",
                   stats: RowStats | None = None) -> Iterator[Record]:
    """Plain-text documents (data.corpora, and .txt files of data.pretrain), Record.text set:
    a JSONL file of {"text": ...} rows (a chat row is rejected), or a .txt file holding one
    document (`txt_documents = "file"`) or one per block between blank lines ("blank_line");
    a document's line is where it starts."""
    if os.fspath(path).endswith(".txt"):
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise DataError(f"{path}: file not found (listed as {source_key})", "file not found",
                            path)
        stats = stats if stats is not None else RowStats()
        return _txt_documents(path, txt_documents, bad_rows, stats)
    return _read(path, source=GENERAL_DOMAIN, source_key=source_key, known_domains=None,
                 instruction=False,
                 bad_rows=bad_rows, stats=stats, text_rows=True, text_only=True)


def _txt_documents(path: str, mode: str, bad_rows: str, stats: RowStats) -> Iterator[Record]:
    """Documents of a .txt file, read line by line (a file of any size): the whole file, or each
    block between blank lines; a document's offset and length are its bytes in the file."""
    counts = stats.file(path)
    start = start_line = None
    offset = 0
    # (line, offset, length) of the current file's last finished block, yielded at once
    documents = []

    def finish(end: int):
        if start is not None:
            documents.append((start_line, start, end - start))

    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            at, offset = offset, offset + len(raw)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                if bad_rows == "error":
                    raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte "
                                    f"{at + e.start})",
                                    "bad text", path, number) from None
                counts["read"] += 1
                counts["rejected"] += 1
                stats.rejected["bad text"] += 1
                log.warning("%s:%d: not valid UTF-8 (%s at byte %d); the rest of the file is "
                            "skipped",
                            path, number, e.reason, at + e.start)
                documents.clear()
                start = None
                break
            if line.strip():
                if start is None:
                    start, start_line = at, number
                continue
            if mode == "blank_line":
                counts["blank"] += 1
                finish(at)
                start = None
            for document in documents:
                yield _txt_record(path, counts, *document)
            documents.clear()
        else:
            finish(offset)
    for document in documents:
        yield _txt_record(path, counts, *document)


def _txt_record(path: str, counts: dict, line: int, offset: int, length: int) -> Record:
    counts["read"] += 1
    counts["kept"] += 1
    return Record((), None, False, path, line, load_content(path, offset, length, True), offset,
                  length)


_OPEN: dict = {}     # path -> file descriptor, for load_row (per process)


def load_row(path: str, offset: int, length: int, is_text: bool):
    """A row read again from its file, as stored: a chat's messages (the row's list of turns,
    with whatever keys they carry) or a document's text (a {"text": ...} JSONL row or a .txt
    document). The row was checked when first read."""
    fd = _OPEN.get(path)
    if fd is None:
        fd = _OPEN[path] = os.open(path, os.O_RDONLY)
    raw = os.pread(fd, length, offset)
    if path.endswith(".txt"):
        return raw.decode("utf-8").strip("\n")
    row = json.loads(raw)
    return row["text"] if is_text else row["messages"]


def load_content(path: str, offset: int, length: int, is_text: bool):
    """load_row, with a chat's turns as a tuple of {role, content}."""
    content = load_row(path, offset, length, is_text)
    if is_text:
        return content
    return tuple({"role": m["role"], "content": m["content"]} for m in content)


def read_instructions(path, *, bad_rows: str = "skip", stats: RowStats | None = None,
                      source_key: str = "distill.instructions") -> Iterator[Record]:
    """General-domain instructions for self-distillation: chats that end with a user turn."""
    return _read(path, source=GENERAL_DOMAIN, source_key=source_key, known_domains=None,
                 instruction=True, bad_rows=bad_rows, stats=stats)
