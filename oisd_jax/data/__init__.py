"""Files -> records -> token ids: parquet/jsonl sources, chat templates, grain streams,
and the embedded synthetic arithmetic task with its in-code tokenizer."""
from oisd_jax.data.pipeline import (
    CutCounter, Example, PromptIterator, encode_example, load_eval_set, make_prompt_dataset, next_batch,
    stack_prompts)
from oisd_jax.data.sources import (
    DEFAULT_SYSTEM_PROMPT, QA_FIELDS, VERL_FIELDS, BadRowError, FieldMap, ReadStats, Record,
    read_many, read_records)
from oisd_jax.data.synthetic import (
    ArithmeticTask, make_problems, prose_response, reference_response, running_total_response, sft_examples, solve,
    synthetic_tokenizer, worked_steps)
from oisd_jax.data.teacher import DEFAULT_TEACHER_TEMPLATE, TeacherPrompt, problem_text
from oisd_jax.data.tokenize import (
    PromptTooLongError, encode_prompt, load_tokenizer, render_prompt, template_head_len)

__all__ = [
    "ArithmeticTask", "BadRowError", "DEFAULT_TEACHER_TEMPLATE", "TeacherPrompt", "problem_text", "CutCounter", "encode_example", "DEFAULT_SYSTEM_PROMPT", "Example", "FieldMap",
    "PromptIterator", "PromptTooLongError", "QA_FIELDS", "ReadStats", "Record", "VERL_FIELDS",
    "encode_prompt", "load_eval_set", "load_tokenizer", "make_problems", "make_prompt_dataset",
    "next_batch", "read_many", "read_records", "prose_response", "reference_response", "render_prompt", "running_total_response",
    "sft_examples", "solve", "stack_prompts", "synthetic_tokenizer", "template_head_len", "worked_steps",
]
