"""OPSD's privileged context: the teacher prompt built from a record's problem and its
reference solution (docs/method.md, "OPSD and the teacher policy").

The teacher is the same model given the problem *and* a worked solution, asked to
re-derive the answer in its own words; it then scores the student's own response token
by token. The prompt is one user turn through the tokenizer's chat template, like the
student's. `{problem}` and `{solution}` in the template are replaced (str.replace, so
the template's other braces, e.g. \\boxed{}, need no escaping).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

# Written for this library (not copied from OPSD's code): the problem, the solution between
# markers, a paragraph asking for an independent derivation of the same answer, the boxed format.
DEFAULT_TEACHER_TEMPLATE = (
    "Problem: {problem}\n\n"
    "A reference solution follows.\n"
    "=== BEGIN REFERENCE SOLUTION ===\n"
    "{solution}\n"
    "=== END REFERENCE SOLUTION ===\n\n"
    "Read the reference solution and make sure you understand why each step holds. Then put it "
    "aside: do not copy its wording, but solve the problem yourself, explaining your reasoning in "
    "your own words, and reach the same final answer.\n\n"
    "Please reason step by step, and put your final answer within \\boxed{}."
)


@dataclasses.dataclass(frozen=True)
class TeacherPrompt:
    """How a record becomes the teacher's prompt (data.teacher_template / teacher_max_prompt_len)."""
    template: str = DEFAULT_TEACHER_TEMPLATE
    max_prompt_len: int = 2048

    def messages(self, record: Mapping[str, Any]) -> list[dict[str, str]]:
        """[user turn]: the template filled with the problem and the record's "solution"
        (data.solution_field), falling back to its answer when it has none."""
        solution = record.get("solution") or record["answer"]
        text = self.template.replace("{problem}", problem_text(record["prompt"])).replace("{solution}", solution)
        return [{"role": "user", "content": text}]


def problem_text(prompt: Sequence[Mapping[str, str]] | str) -> str:
    """The problem of a student prompt: its last user message (or the string itself)."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    if not users:
        raise ValueError("a chat prompt without a user message has no problem for the teacher prompt")
    return users[-1]
