"""The embedded default task: seeded arithmetic problems and a tokenizer defined in code.

A tiny transformer (2-4 layers, d=64-128) learns 2-digit addition/subtraction in
minutes on CPU, yet starts well below perfect, so RL has signal. The tokenizer is a real
`PreTrainedTokenizerFast` (WordLevel over characters and a few words, < 64 ids) with a
chat template, so the synthetic task runs the same code path as Qwen3/Llama:
apply_chat_template, decode, save_pretrained / AutoTokenizer reload, math reward.

Prompt:   <bos><|user|>what is 12+7*3?<|assistant|>
Response: \\boxed{33}<eos>            (or, with reasoning: 12+7*3 -> 12+21 -> 33, \\boxed{33}<eos>)
`\\boxed{` is a single token; every other character, `}` included, is one token.
"""
from __future__ import annotations

import dataclasses
import string
from typing import Sequence

import numpy as np

from oisd_jax.choices import SYNTHETIC_PROSE as PROSE_STYLES
from oisd_jax.data.sources import Record

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>")
BOXED_TOKEN = "\\boxed{"
CHARS = tuple(string.digits) + tuple("+-*/=().,?: \n{}")
WORDS = ("Please", "reason", "step", "by", "and", "put", "your", "final", "answer", "within",
         "what", "is", "the", "so", "compute")
ARROW = " -> "  # between the rewritten expressions of a worked response
# ">" comes last so the ids of the older tokens (and saved runs' tokenizers) stay as they were
VOCAB = SPECIAL_TOKENS + (BOXED_TOKEN,) + CHARS + WORDS + (">",)
OPS = ("+", "-", "*")

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{- raise_exception('unknown role: ' + m['role']) -}}"
    "{%- endif -%}"
    "{{- '<|' + m['role'] + '|>' + m['content'] -}}"
    "{%- if m['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}"
)


def synthetic_tokenizer():
    """A fresh PreTrainedTokenizerFast over VOCAB (ids = positions in VOCAB, pad = 0)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    # every character is its own piece, except runs of letters (the words)
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[A-Za-z]+|\s|."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # concatenate pieces: spaces are tokens of their own
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(BOXED_TOKEN, special=False, normalized=False)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>", extra_special_tokens=list(SPECIAL_TOKENS[4:]),
        chat_template=CHAT_TEMPLATE, model_max_length=4096,
    )


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Difficulty knobs. digits: operand size; ops: subset of + - * (tuple or "+-");
    num_terms >= 2.

    The default (2-digit + and -, two terms) is learnable by a 2-layer d=64 model within
    minutes but not by a bigram lookup. `reasoning` makes the reference response (the
    warm-up's target) a worked chain, the expression rewritten one operation at a time
    (`7-3+5 -> 4+5 -> 9, \\boxed{9}`); the reward still reads only the box.
    `few_shot` puts that many solved problems before the question, as earlier chat turns whose
    answers are worked in prose (`prose_response`): a pretrained instruct model sees the format
    it is scored on. Measured on SmolLM2-135M-Instruct (1-digit, 3 terms, +, T=0.7, 96 samples):
    the system prompt alone gives 0% boxed and correct, one shot 12.5%, two shots 47%.
    The shots use their own fixed seed, so every prompt of every split shows the same examples.
    `prose` is how those answers are worked: "brief" (`prose_response`, ~40 tokens at three
    terms) or "running_total" (`running_total_response`, left to right, each step a sentence:
    ~90 tokens at three terms, the same arithmetic; for + and - only).
    """

    digits: int = 2
    ops: tuple[str, ...] = ("+", "-")
    num_terms: int = 2
    reasoning: bool = False
    system_prompt: str | None = None
    few_shot: int = 0
    prose: str = "brief"

    def __post_init__(self):
        if isinstance(self.ops, str):  # configs spell ops as a string, e.g. "+-"
            object.__setattr__(self, "ops", tuple(self.ops))
        if (self.digits < 1 or self.num_terms < 2 or not self.ops or set(self.ops) - set(OPS)
                or self.few_shot < 0 or self.prose not in PROSE_STYLES
                or (self.prose == "running_total" and "*" in self.ops)):
            raise ValueError(f"bad ArithmeticTask {self}: digits >= 1, num_terms >= 2, ops in {OPS}, "
                             f"few_shot >= 0, prose in {PROSE_STYLES} (running_total: ops of + and - only)")


def _tokens(expression: str) -> tuple[list[int], list[str]]:
    nums, ops, cur = [], [], ""
    for c in expression:
        if c.isdigit():
            cur += c
        elif c in OPS and cur:
            nums.append(int(cur))
            ops.append(c)
            cur = ""
        else:
            raise ValueError(f"not an arithmetic expression: {expression!r}")
    if not cur:
        raise ValueError(f"not an arithmetic expression: {expression!r}")
    return nums + [int(cur)], ops


def solve(expression: str) -> tuple[int, list[str]]:
    """Value of `a op b op ...` (usual precedence, no eval) and the steps taken."""
    nums, ops = _tokens(expression)
    steps = []
    vals, pending = [nums[0]], []
    for op, b in zip(ops, nums[1:]):  # multiplications first
        if op == "*":
            steps.append(f"{vals[-1]}*{b}={vals[-1] * b}")
            vals[-1] *= b
        else:
            vals.append(b)
            pending.append(op)
    acc = vals[0]
    for op, b in zip(pending, vals[1:]):  # then left to right
        new = acc + b if op == "+" else acc - b
        steps.append(f"{acc}{op}{b}={new}")
        acc = new
    return acc, steps


def worked_steps(expression: str) -> list[str]:
    """The expression rewritten one operation at a time, in solve's order (the leftmost
    product first, then left to right): "12+7*3-5" -> ["12+7*3-5", "12+21-5", "33-5", "28"]."""
    nums, ops = _tokens(expression)
    chain = [expression]
    while ops:
        i = ops.index("*") if "*" in ops else 0
        a, b = nums[i], nums[i + 1]
        nums[i:i + 2] = [a * b if ops[i] == "*" else a + b if ops[i] == "+" else a - b]
        del ops[i]
        # a negative running value only ever leads (products are of non-negative operands)
        chain.append(str(nums[0]) + "".join(f"{o}{n}" for o, n in zip(ops, nums[1:])))
    return chain


def reference_response(expression: str, *, reasoning: bool = False) -> str:
    """The response the reward scores 1 (without the EOS, which the template appends)."""
    answer = f"{BOXED_TOKEN}{solve(expression)[0]}}}"
    return f"{ARROW.join(worked_steps(expression))}, {answer}" if reasoning else answer


def prose_response(expression: str) -> str:
    """A worked answer in sentences, one operation each, in solve's order:
    "3+4+5" -> "We compute one operation at a time. First, 3+4 = 7. Then, 7+5 = 12. The answer is \\boxed{12}." """
    value, steps = solve(expression)
    said = [f"{'First' if i == 0 else 'Then'}, {s.replace('=', ' = ')}." for i, s in enumerate(steps)]
    return f"We compute one operation at a time. {' '.join(said)} The answer is {BOXED_TOKEN}{value}}}."


def running_total_response(expression: str) -> str:
    """A worked answer that keeps a running total, left to right, one sentence per term
    (+ and - only, where left to right is the order of operations):
    "3+4+5" -> "We add the numbers one at a time and keep a running total. The numbers are
    3, 4 and 5. We start with 3. Next we add 4: 3 + 4 = 7, so the running total is 7. Next we
    add 5: 7 + 5 = 12, so the running total is 12. All the numbers have been added, so the
    answer is \\boxed{12}." Measured on SmolLM2-135M-Instruct with two such examples (1-digit,
    3 terms, +, T=0.7, 16 problems x 4): 29.7% right, 10 of 16 groups mixed, 88 tokens."""
    nums, ops = _tokens(expression)
    if "*" in ops:
        raise ValueError(f"running_total_response works left to right: no '*' in {expression!r}")
    listed = ", ".join(map(str, nums[:-1])) + f" and {nums[-1]}"
    verb = "add" if set(ops) == {"+"} else "take"
    said = [f"We {verb} the numbers one at a time and keep a running total. The numbers are {listed}.",
            f"We start with {nums[0]}."]
    acc = nums[0]
    for op, b in zip(ops, nums[1:]):
        new = acc + b if op == "+" else acc - b
        said.append(f"Next we {'add' if op == '+' else 'subtract'} {b}: {acc} {op} {b} = {new}, "
                    f"so the running total is {new}.")
        acc = new
    said.append(f"All the numbers have been {'added' if verb == 'add' else 'used'}, so the answer is "
                f"{BOXED_TOKEN}{acc}}}.")
    return " ".join(said)


_PROSE = {"brief": prose_response, "running_total": running_total_response}
_SHOT_SEED = 2**31 - 1  # the few-shot examples' own stream, apart from every problem seed


def _expressions(rng: np.random.Generator, task: ArithmeticTask, n: int) -> list[str]:
    lo, hi = (10 ** (task.digits - 1) if task.digits > 1 else 0), 10 ** task.digits
    out = []
    for _ in range(n):
        nums = rng.integers(lo, hi, size=task.num_terms)
        ops = rng.choice(list(task.ops), size=task.num_terms - 1)
        out.append(str(nums[0]) + "".join(f"{o}{b}" for o, b in zip(ops, nums[1:])))
    return out


def make_problems(n: int, *, seed: int, task: ArithmeticTask = ArithmeticTask()) -> list[Record]:
    """n seeded problems: {"prompt": chat messages, "answer": str, "expression": str, "solution": str}."""
    rng = np.random.default_rng(seed)
    shots = []
    for e in _expressions(np.random.default_rng(_SHOT_SEED), task, task.few_shot):
        shots += [{"role": "user", "content": f"what is {e}?"}, {"role": "assistant", "content": _PROSE[task.prose](e)}]
    records = []
    for expression in _expressions(rng, task, n):
        prompt = [*shots, {"role": "user", "content": f"what is {expression}?"}]
        if task.system_prompt:
            prompt.insert(0, {"role": "system", "content": task.system_prompt})
        # "solution": the worked steps, OPSD's privileged teacher context for this task
        records.append({"prompt": prompt, "answer": str(solve(expression)[0]),
                        "expression": expression, "solution": reference_response(expression, reasoning=True)})
    return records


def sft_examples(records: Sequence[Record], tokenizer, *, reasoning: bool = False
                 ) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prompt_ids, response_ids) int32 pairs for a supervised warm-up; response ends in EOS."""
    out = []
    for r in records:
        prompt = tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        text = reference_response(r["expression"], reasoning=reasoning)
        response = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        out.append((np.asarray(prompt, np.int32), np.asarray(response, np.int32)))
    return out
