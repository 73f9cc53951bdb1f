"""Read math problem sets (parquet / jsonl) into records {"prompt": ..., "answer": str}.

`prompt` is a list of chat messages ({"role", "content"}), or a plain string for raw
(template-free) prompting. Two layouts are common:
- verl / the paper's files: `prompt` already holds the chat messages (system + user) and
  the answer sits at the dotted path `reward_model.ground_truth`  -> `VERL_FIELDS`;
- plain `question` / `answer` columns: the prompt is built as [system, user question]
  with the paper's system prompt (docs/method.md)                 -> `QA_FIELDS`.
Bad rows (missing / empty / malformed fields) are counted, and the first one is reported
with its file, row and field; `on_bad_row` chooses between skipping and failing.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Iterable, Literal

from oisd_jax.choices import BAD_ROW_POLICIES

DEFAULT_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
BadRowPolicy = Literal[BAD_ROW_POLICIES]  # "skip" | "error", declared once in oisd_jax.choices
Record = dict[str, Any]
log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class FieldMap:
    """Where a record's pieces live in a row. Paths are dotted (`reward_model.ground_truth`).

    Exactly one of `prompt` (chat messages or a string) and `question` (a string turned
    into [system, user] messages) is set. `system_prompt=None` drops the system message.
    """

    prompt: str | None = "prompt"
    question: str | None = None
    answer: str = "reward_model.ground_truth"
    system_prompt: str | None = DEFAULT_SYSTEM_PROMPT
    solution: str | None = None  # a worked solution (OPSD's teacher context); None = not read

    def __post_init__(self):
        if (self.prompt is None) == (self.question is None):
            raise ValueError(f"FieldMap needs exactly one of prompt= / question=, got {self}")

    @property
    def paths(self) -> list[str]:
        return [p for p in (self.prompt, self.question, self.answer, self.solution) if p]


VERL_FIELDS = FieldMap()
QA_FIELDS = FieldMap(prompt=None, question="question", answer="answer")


class BadRowError(ValueError):
    pass


@dataclasses.dataclass
class ReadStats:
    path: str
    num_rows: int = 0
    num_bad: int = 0
    first_bad: str | None = None  # "file:row N: field 'x': why"

    @property
    def num_ok(self) -> int:
        return self.num_rows - self.num_bad


class _Bad(Exception):
    def __init__(self, field: str, why: str):
        super().__init__(f"field {field!r}: {why}")


def _get(row: dict, path: str) -> Any:
    if path in row:  # a flattened column literally named "a.b"
        return row[path]
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            raise _Bad(path, "missing")
        value = value[key]
    return value


def _messages(value: Any, field: str) -> list[dict[str, str]]:
    # parquet via pandas gives numpy arrays of dicts; via pyarrow, lists: accept both.
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if not isinstance(value, (list, tuple)) or not value:
        raise _Bad(field, f"expected a non-empty list of chat messages, got {type(value).__name__}")
    out = []
    for k, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise _Bad(field, f"message {k} has no role")
        if not isinstance(m.get("content"), str):
            raise _Bad(field, f"message {k} has no string content")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["content"].strip() for m in out if m["role"] != "system"):
        raise _Bad(field, "no non-empty user content")
    return out


def _text(value: Any, field: str) -> str:
    if value is None:
        raise _Bad(field, "null")
    if isinstance(value, float) and value != value:  # NaN from pandas
        raise _Bad(field, "NaN")
    if isinstance(value, (dict, list, tuple)):
        raise _Bad(field, f"expected text, got {type(value).__name__}")
    text = str(value).strip()  # integer answers in jsonl are fine
    if not text:
        raise _Bad(field, "empty")
    return text


def row_to_record(row: dict, fields: FieldMap) -> Record:
    """One raw row -> record; raises _Bad naming the field that is wrong."""
    if fields.prompt is not None:
        raw = _get(row, fields.prompt)
        prompt = _text(raw, fields.prompt) if isinstance(raw, str) else _messages(raw, fields.prompt)
    else:
        question = _text(_get(row, fields.question), fields.question)
        prompt = [{"role": "user", "content": question}]
        if fields.system_prompt:
            prompt.insert(0, {"role": "system", "content": fields.system_prompt})
    rec = {"prompt": prompt, "answer": _text(_get(row, fields.answer), fields.answer)}
    if fields.solution:
        rec["solution"] = _text(_get(row, fields.solution), fields.solution)
    return rec


def _rows(path: Path, field_paths: list[str]) -> Iterable[dict | _Bad]:
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            present = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as e:  # truncated or not parquet: name the file
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        # read only the columns we need: a whole-column name, else the top of a dotted path
        columns = sorted({p if p in present else p.split(".")[0] for p in field_paths})
        missing = [c for c in columns if c not in present]
        if missing:  # a wrong field mapping, not a bad row: say so at once
            raise ValueError(f"{path}: no column(s) {missing}; columns are {present}")
        try:
            table = pq.read_table(path, columns=columns)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({type(e).__name__}: {e})") from None
        yield from table.to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        with path.open("rb") as f:  # decoded per line: one bad byte is one bad row, not a crash
            for raw in f:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield _Bad("<utf-8>", f"not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start})")
                    continue
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    yield _Bad("<json>", f"not valid JSON ({e.msg})")
                    continue
                yield row if isinstance(row, dict) else _Bad("<json>", "not a JSON object")
    else:
        raise ValueError(f"{path}: unsupported file type {path.suffix!r} (use .parquet or .jsonl)")


def read_records(
    path: str | Path, fields: FieldMap = VERL_FIELDS, *, on_bad_row: BadRowPolicy = "skip"
) -> tuple[list[Record], ReadStats]:
    """Records of one parquet/jsonl file, plus counts of rows read and rows rejected."""
    if on_bad_row not in ("skip", "error"):
        raise ValueError(f"on_bad_row must be 'skip' or 'error', got {on_bad_row!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path.resolve()}")
    stats, records = ReadStats(str(path)), []
    for i, row in enumerate(_rows(path, fields.paths)):
        stats.num_rows += 1
        try:
            if isinstance(row, _Bad):
                raise row
            records.append(row_to_record(row, fields))
        except _Bad as e:
            where = f"{path}: row {i}: {e}"
            if on_bad_row == "error":
                raise BadRowError(where) from None
            stats.num_bad += 1
            stats.first_bad = stats.first_bad or where
    if stats.num_bad:
        log.warning("skipped %d of %d rows; first: %s", stats.num_bad, stats.num_rows, stats.first_bad)
    return records, stats


def read_many(
    paths: str | Path | Iterable[str | Path], fields: FieldMap = VERL_FIELDS,
    *, on_bad_row: BadRowPolicy = "skip",
) -> tuple[list[Record], list[ReadStats]]:
    """Concatenated records of several files (in the given order)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    records, all_stats = [], []
    for p in paths:
        recs, stats = read_records(p, fields, on_bad_row=on_bad_row)
        records.extend(recs)
        all_stats.append(stats)
    return records, all_stats
