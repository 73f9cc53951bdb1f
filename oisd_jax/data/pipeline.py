"""Records -> a checkpointable, per-process-sharded stream of tokenized prompts (grain).

Order: index range -> seeded shuffle -> this process's slice -> repeat (reshuffled each
epoch) -> tokenize (lazily, so only consumed prompts are tokenized). Shuffling *before*
slicing gives a global shuffle every epoch, with the processes' slices disjoint within
each epoch. With `repeat=True` every process gets floor(N / process_count) prompts per
epoch (the same count everywhere, so hosts never disagree on epoch boundaries; the
few left over differ from epoch to epoch); with `repeat=False` (evaluation) the slices
cover every record once.

The iterator's state is a small JSON-serialisable dict (grain's position plus a
fingerprint of the stream's definition); restoring it continues with exactly the same
order, and restoring into a differently-defined stream raises instead of silently
replaying other data. `PromptIterator` is a `grain.DatasetIterator`, so grain's orbax
checkpoint handler accepts it too.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import grain
import numpy as np

from oisd_jax.data.sources import VERL_FIELDS, BadRowPolicy, FieldMap, Record, read_records
from oisd_jax.choices import TRUNCATIONS
from oisd_jax.data.teacher import TeacherPrompt
from oisd_jax.data.tokenize import Truncation, encode_full_prompt, fit_encoded

# {"prompt_ids": int32 [T], "answer": str, "index": int, "prompt_cut": int} (+ "teacher_ids",
# "teacher_cut" with a TeacherPrompt)
Example = dict[str, Any]
log = logging.getLogger(__name__)


def encode_example(tokenizer, prompt, *, max_prompt_len: int | None, truncation: Truncation, where: str,
                   chat_template_kwargs: Mapping[str, Any] | None = None) -> tuple[np.ndarray, int]:
    """(prompt ids, tokens cut) -- the cut is counted, never silent."""
    full = encode_full_prompt(tokenizer, prompt, chat_template_kwargs=chat_template_kwargs)
    ids = fit_encoded(tokenizer, prompt, full, max_prompt_len, truncation, where=where,
                      chat_template_kwargs=chat_template_kwargs)
    return ids, len(full) - len(ids)


class CutCounter:
    """Prompts cut to data.max_prompt_len: per batch (a metric), in total, warned once."""

    def __init__(self, what: str = "training prompts", truncation: Truncation = "left"):
        self.what, self.truncation, self.total, self.seen, self.warned = what, truncation, 0, 0, False
        self.last = 0  # prompts cut in the latest batch

    def observe(self, batch: Sequence[Example]) -> int:
        cut = [e.get("prompt_cut", 0) for e in batch]
        n = sum(c > 0 for c in cut)
        self.total, self.seen, self.last = self.total + n, self.seen + len(batch), n
        if n and not self.warned:
            self.warned = True
            lost = {"middle": "from the middle (the template head with the system prompt, and the end with "
                              "the question, kept)",
                    "left": "from the left (the system prompt / question start)"}.get(self.truncation, "")
            log.warning("%d of %d %s were longer than data.max_prompt_len and lost up to %d tokens %s; counted "
                        "in the metric prompts_truncated. Raise data.max_prompt_len or set data.truncation='error'",
                        n, len(batch), self.what, max(cut), lost)
        return n


def _records_digest(records: Sequence[Record]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r["prompt"], r["answer"]], sort_keys=True).encode())
    return h.hexdigest()[:16]


class PromptIterator(grain.DatasetIterator):
    """Iterator over examples whose state (get_state/set_state) is JSON and validated."""

    def __init__(self, parent: grain.DatasetIterator, fingerprint: Mapping[str, Any]):
        super().__init__(parent)
        self.fingerprint = dict(fingerprint)

    def __next__(self) -> Example:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return {"grain": self._parent.get_state(), "fingerprint": dict(self.fingerprint)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        saved = dict(state.get("fingerprint", {}))
        if saved != self.fingerprint:
            diff = {k: (saved.get(k), self.fingerprint.get(k))
                    for k in set(saved) | set(self.fingerprint) if saved.get(k) != self.fingerprint.get(k)}
            raise ValueError(f"data iterator state is for another stream; (saved, now): {diff}")
        self._parent.set_state(state["grain"])


def make_prompt_dataset(
    records: Sequence[Record],
    tokenizer,
    *,
    max_prompt_len: int,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    process_index: int = 0,
    process_count: int = 1,
    truncation: Truncation = "left",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    prefetch: int = 0,
    teacher: TeacherPrompt | None = None,
) -> PromptIterator:
    """An iterator of {"prompt_ids": int32 [T<=max_prompt_len], "answer": str, "index": int}.

    `index` is the record's position in `records`. `prefetch` > 0 tokenizes ahead in a
    background thread (grain ReadOptions); 0 keeps everything in the calling thread.
    Multi-host: pass jax.process_index() / jax.process_count().
    teacher: also tokenize OPSD's teacher prompt of each record ("teacher_ids").
    """
    n = len(records)
    if n == 0:
        raise ValueError("make_prompt_dataset got no records")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if repeat and n < process_count:
        raise ValueError(f"{n} records cannot be split over {process_count} processes")
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")

    ds = grain.MapDataset.range(n)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    stop = (n // process_count) * process_count if repeat else n
    ds = ds[process_index:stop:process_count]
    if repeat:
        ds = ds.repeat()  # reseeds the shuffle each epoch

    def to_example(i: int) -> Example:
        rec = records[int(i)]
        ids, cut = encode_example(tokenizer, rec["prompt"], max_prompt_len=max_prompt_len, truncation=truncation,
                                  where=f"training record {int(i)}", chat_template_kwargs=chat_template_kwargs)
        ex = {"prompt_ids": ids, "answer": rec["answer"], "index": int(i), "prompt_cut": cut}
        if teacher is not None:
            ex["teacher_ids"], ex["teacher_cut"] = encode_example(
                tokenizer, teacher.messages(rec), max_prompt_len=teacher.max_prompt_len, truncation=truncation,
                where=f"teacher prompt of training record {int(i)}", chat_template_kwargs=chat_template_kwargs)
        return ex

    ds = ds.map(to_example)
    options = grain.ReadOptions(num_threads=1 if prefetch > 0 else 0, prefetch_buffer_size=prefetch)
    fingerprint = {
        "num_records": n, "records_sha256": _records_digest(records), "seed": seed,
        "shuffle": shuffle, "repeat": repeat, "process_index": process_index,
        "process_count": process_count,
    }  # what fixes the order; prompt length limits may change on resume
    return PromptIterator(iter(ds.to_iter_dataset(options)), fingerprint)


def next_batch(iterator: Iterator[Example], n: int) -> list[Example]:
    """The next n examples; fewer (maybe none) only when a non-repeating stream ends."""
    batch = []
    for _ in range(n):
        try:
            batch.append(next(iterator))
        except StopIteration:
            break
    return batch


def stack_prompts(batch: Sequence[Example], pad_id: int, length: int | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompt tokens [B, P] int32 and their lengths [B] int32 (for a sampler)."""
    lengths = np.array([len(e["prompt_ids"]) for e in batch], np.int32)
    length = int(lengths.max(initial=0)) if length is None else length
    if len(batch) and lengths.max() > length:
        raise ValueError(f"a prompt has {lengths.max()} tokens > length={length}")
    out = np.full((len(batch), length), pad_id, np.int32)
    for row, e in enumerate(batch):
        if len(e["prompt_ids"]):
            out[row, length - len(e["prompt_ids"]):] = e["prompt_ids"]
    return out, lengths


def load_eval_set(
    path: str | Path,
    fields: FieldMap = VERL_FIELDS,
    *,
    tokenizer=None,
    max_prompt_len: int | None = None,
    truncation: Truncation = "left",
    on_bad_row: BadRowPolicy = "error",
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[Example]:
    """A whole evaluation file, in file order: records plus "index" (and "prompt_ids" if a
    tokenizer is given). Bad rows fail by default: a benchmark must not silently shrink."""
    records, _ = read_records(path, fields, on_bad_row=on_bad_row)
    out = []
    for i, rec in enumerate(records):
        ex = {**rec, "index": i}
        if tokenizer is not None:
            ex["prompt_ids"], ex["prompt_cut"] = encode_example(
                tokenizer, rec["prompt"], max_prompt_len=max_prompt_len, truncation=truncation,
                where=f"{path}: problem {i}", chat_template_kwargs=chat_template_kwargs)
        out.append(ex)
    CutCounter(f"prompts of {path}", truncation).observe(out)
    return out
