"""Prompts -> int32 token ids through the tokenizer's own chat template.

Every model (Qwen3, Llama, the synthetic task's in-code tokenizer) goes through
`tokenizer.apply_chat_template`, so the template is the single source of truth for role
markers and BOS. Qwen3's template reads `enable_thinking`; we pass `enable_thinking=False`
(thinking disabled: docs/method.md, "Prompts and reward") to every template, which is
harmless because a Jinja template ignores variables it does not use.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from oisd_jax.choices import TRUNCATIONS

Truncation = Literal[TRUNCATIONS]  # "middle" | "left" | "error", declared once in oisd_jax.choices
DEFAULT_TEMPLATE_KWARGS: Mapping[str, Any] = {"enable_thinking": False}


class PromptTooLongError(ValueError):
    pass


def load_tokenizer(path: str | Path):
    """A local Hugging Face tokenizer folder (tokenizer.json / tokenizer_config.json)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {path.resolve()}")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise OSError(f"could not load a tokenizer from {path.resolve()}: {e}") from e


def _as_ids(out: Any) -> list[int]:
    # transformers 5 returns a BatchEncoding unless return_dict=False; accept either.
    if hasattr(out, "keys") and "input_ids" in out:
        out = out["input_ids"]
    return list(out)


def render_prompt(tokenizer, prompt: Sequence[Mapping[str, str]] | str,
                  chat_template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The prompt text exactly as the model sees it (for logs and debugging)."""
    if isinstance(prompt, str):
        return prompt
    kwargs = dict(DEFAULT_TEMPLATE_KWARGS if chat_template_kwargs is None else chat_template_kwargs)
    return tokenizer.apply_chat_template(
        [dict(m) for m in prompt], add_generation_prompt=True, tokenize=False, **kwargs)


def encode_prompt(
    tokenizer,
    prompt: Sequence[Mapping[str, str]] | str,
    *,
    max_prompt_len: int | None = None,
    truncation: Truncation = "left",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    where: str = "prompt",
) -> np.ndarray:
    """Token ids [T] int32 of a prompt, ending where the assistant's reply starts.

    Chat messages go through the chat template with the generation prompt; a plain
    string is encoded as is (the tokenizer's own special tokens, e.g. a BOS, included).
    Over `max_prompt_len`: 'middle' keeps the chat template's head (BOS, system prompt,
    user header) and the end (the question's end and the assistant header) and cuts
    between them; 'left' keeps the last tokens only; 'error' raises PromptTooLongError
    naming `where` (see fit_prompt).
    """
    ids = encode_full_prompt(tokenizer, prompt, chat_template_kwargs=chat_template_kwargs)
    return fit_encoded(tokenizer, prompt, ids, max_prompt_len, truncation, where=where,
                       chat_template_kwargs=chat_template_kwargs)


def template_head_len(tokenizer, prompt: Sequence[Mapping[str, str]] | str, *,
                      chat_template_kwargs: Mapping[str, Any] | None = None) -> int:
    """Tokens of the chat template before the last user message's content: BOS, the system
    prompt, earlier turns and the user header. Found as the common prefix of the prompt's
    ids and those of the same messages with that content emptied, so no template is parsed
    (a token merging across the boundary just ends the head one token early). 0 for a
    plain string or messages without a user turn."""
    if isinstance(prompt, str):
        return 0
    msgs = [dict(m) for m in prompt]
    users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
    if not users:
        return 0
    full = encode_full_prompt(tokenizer, msgs, chat_template_kwargs=chat_template_kwargs)
    msgs[users[-1]]["content"] = ""
    empty = encode_full_prompt(tokenizer, msgs, chat_template_kwargs=chat_template_kwargs)
    n = min(len(full), len(empty))
    differ = np.nonzero(full[:n] != empty[:n])[0]
    return int(differ[0]) if differ.size else n


def fit_encoded(tokenizer, prompt, ids: np.ndarray, max_prompt_len: int | None, truncation: Truncation, *,
                where: str = "prompt", chat_template_kwargs: Mapping[str, Any] | None = None) -> np.ndarray:
    """fit_prompt of `prompt`'s full ids, with the template head measured when 'middle' cuts."""
    over = max_prompt_len is not None and len(ids) > max_prompt_len
    head = (template_head_len(tokenizer, prompt, chat_template_kwargs=chat_template_kwargs)
            if over and truncation == "middle" else 0)
    return fit_prompt(ids, max_prompt_len, truncation, where=where, head=head)


def encode_full_prompt(tokenizer, prompt: Sequence[Mapping[str, str]] | str, *,
                       chat_template_kwargs: Mapping[str, Any] | None = None) -> np.ndarray:
    """The prompt's token ids [T] int32, never cut (encode_prompt without a limit)."""
    if isinstance(prompt, str):
        ids = _as_ids(tokenizer(prompt)["input_ids"])
    else:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"{type(tokenizer).__name__} has no chat template; "
                             "use string prompts or a tokenizer that has one")
        kwargs = dict(DEFAULT_TEMPLATE_KWARGS if chat_template_kwargs is None else chat_template_kwargs)
        ids = _as_ids(tokenizer.apply_chat_template(
            [dict(m) for m in prompt], add_generation_prompt=True, tokenize=True,
            return_dict=False, **kwargs))
    return np.asarray(ids, dtype=np.int32)


def fit_prompt(ids: np.ndarray, max_prompt_len: int | None, truncation: Truncation = "left", *,
               where: str = "prompt", head: int = 0) -> np.ndarray:
    """`ids` cut to `max_prompt_len`, or PromptTooLongError ('error').

    'left' keeps the last `max_prompt_len` tokens. 'middle' keeps the first `head` tokens
    (the template head: template_head_len) and fills the rest with the last tokens, so the
    cut falls inside the long user message; the head is capped at half the limit, so at
    least half is always the prompt's end (the question and the generation prompt).
    """
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if max_prompt_len is not None and max_prompt_len < 1:
        raise ValueError(f"max_prompt_len must be >= 1, got {max_prompt_len}")
    if max_prompt_len is not None and len(ids) > max_prompt_len:
        if truncation == "error":
            raise PromptTooLongError(f"{where} has {len(ids)} tokens > data.max_prompt_len={max_prompt_len} "
                                     "(data.truncation='error')")
        keep_head = min(int(head), max_prompt_len // 2) if truncation == "middle" else 0
        ids = np.concatenate([ids[:keep_head], ids[len(ids) - (max_prompt_len - keep_head):]])
    return np.asarray(ids, dtype=np.int32)
