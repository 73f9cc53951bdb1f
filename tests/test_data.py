"""Data: parquet/jsonl sources, chat templates, grain streams, the synthetic task."""
import dataclasses
import json
import operator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from oisd_jax import data
from oisd_jax.data import (
    QA_FIELDS, VERL_FIELDS, ArithmeticTask, BadRowError, FieldMap, PromptTooLongError,
    encode_prompt, load_eval_set, load_tokenizer, make_problems, make_prompt_dataset,
    next_batch, read_records, reference_response, synthetic_tokenizer)
from oisd_jax.rewards import math_reward

SYS = data.DEFAULT_SYSTEM_PROMPT


def _chat(q):
    return [{"role": "system", "content": SYS}, {"role": "user", "content": q}]


# ----------------------------------------------------------------------------- sources

@pytest.fixture()
def verl_parquet(tmp_path):
    rows = [
        {"prompt": _chat("What is 1+1?"), "reward_model": {"ground_truth": "2"}},
        {"prompt": _chat("Half of 1?"), "reward_model": {"ground_truth": "\\frac{1}{2}"}},
        {"prompt": [], "reward_model": {"ground_truth": "3"}},                       # row 2
        {"prompt": _chat("Empty answer"), "reward_model": {"ground_truth": ""}},     # row 3
        {"prompt": _chat("Null answer"), "reward_model": {"ground_truth": None}},    # row 4
        {"prompt": [{"role": "user", "content": None}], "reward_model": {"ground_truth": "1"}},
        {"prompt": _chat("What is 2*3?"), "reward_model": {"ground_truth": "6"}},
    ]
    path = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_verl_skip_counts_and_reports(verl_parquet):
    records, stats = read_records(verl_parquet, VERL_FIELDS, on_bad_row="skip")
    assert [r["answer"] for r in records] == ["2", "\\frac{1}{2}", "6"]
    assert records[0]["prompt"] == _chat("What is 1+1?")
    assert (stats.num_rows, stats.num_bad, stats.num_ok) == (7, 4, 3)
    assert str(verl_parquet) in stats.first_bad and "row 2" in stats.first_bad
    assert "'prompt'" in stats.first_bad


def test_parquet_verl_error_policy_names_file_row_field(verl_parquet):
    with pytest.raises(BadRowError, match=r"train\.parquet: row 2: field 'prompt'"):
        read_records(verl_parquet, on_bad_row="error")
    good = verl_parquet.parent / "good.parquet"
    table = pq.read_table(verl_parquet)
    pq.write_table(table.take([0, 1, 6]), good)
    records, stats = read_records(good, on_bad_row="error")
    assert len(records) == 3 and stats.num_bad == 0


def test_missing_file_and_column_errors(tmp_path, verl_parquet):
    with pytest.raises(FileNotFoundError, match="nope.parquet"):
        read_records(tmp_path / "nope.parquet")
    with pytest.raises(ValueError, match="question"):
        read_records(verl_parquet, QA_FIELDS)
    with pytest.raises(ValueError, match="unsupported"):
        (tmp_path / "x.csv").write_text("a,b\n")
        read_records(tmp_path / "x.csv")
    with pytest.raises(ValueError):
        FieldMap(prompt="prompt", question="question")


def _write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_jsonl_question_answer_fields(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [
        {"question": "What is 2+2?", "answer": 4},
        {"question": "  ", "answer": "1"},            # row 1: empty question
        "{not json",                                   # row 2
        {"question": "Cube of 2?", "answer": "8", "extra": [1, 2]},
        {"answer": "5"},                               # row 4: no question
        {"question": "List?", "answer": [1, 2]},       # row 5: answer is not text
    ])
    records, stats = read_records(path, QA_FIELDS)
    assert records == [{"prompt": _chat("What is 2+2?"), "answer": "4"},
                       {"prompt": _chat("Cube of 2?"), "answer": "8"}]
    assert (stats.num_rows, stats.num_bad) == (6, 4)
    assert "row 1: field 'question': empty" in stats.first_bad
    with pytest.raises(BadRowError, match="row 1"):
        read_records(path, QA_FIELDS, on_bad_row="error")
    no_sys, _ = read_records(path, FieldMap(prompt=None, question="question", answer="answer",
                                            system_prompt=None))
    assert no_sys[0]["prompt"] == [{"role": "user", "content": "What is 2+2?"}]


def test_field_mapping_dotted_paths_and_string_prompts(tmp_path):
    path = _write_jsonl(tmp_path / "custom.jsonl", [
        {"text": "Q: 3+4?", "meta": {"solution": {"final": "7"}}},
        {"text": "Q: 1+4?", "meta": {"solution": {}}},
    ])
    fields = FieldMap(prompt="text", answer="meta.solution.final")
    records, stats = read_records(path, fields)
    assert records == [{"prompt": "Q: 3+4?", "answer": "7"}]
    assert "field 'meta.solution.final': missing" in stats.first_bad
    # pandas hands parquet lists over as numpy object arrays
    row = {"prompt": np.array(_chat("hi"), dtype=object), "reward_model": {"ground_truth": 3}}
    assert data.sources.row_to_record(row, VERL_FIELDS) == {"prompt": _chat("hi"), "answer": "3"}


# ----------------------------------------------------------------------------- tokenize

@pytest.fixture(scope="module")
def tok():
    return synthetic_tokenizer()


def test_encode_prompt_truncation(tok):
    msgs = [{"role": "user", "content": "what is 12+34?"}]
    full = encode_prompt(tok, msgs)
    assert full.dtype == np.int32
    assert tok.decode(full) == "<bos><|user|>what is 12+34?<|assistant|>"
    cut = encode_prompt(tok, msgs, max_prompt_len=5)
    np.testing.assert_array_equal(cut, full[-5:])
    assert tok.decode(cut) == "+34?<|assistant|>"
    np.testing.assert_array_equal(encode_prompt(tok, msgs, max_prompt_len=len(full),
                                                truncation="error"), full)
    with pytest.raises(PromptTooLongError, match=f"{len(full)} tokens"):
        encode_prompt(tok, msgs, max_prompt_len=len(full) - 1, truncation="error")
    assert tok.decode(encode_prompt(tok, "what is 1+1?")) == "what is 1+1?"


# ----------------------------------------------------------------------------- pipeline

def _indices(batch):
    return [e["index"] for e in batch]


@pytest.fixture(scope="module")
def problems():
    return make_problems(13, seed=0)


def test_stream_examples_match_records(tok, problems):
    it = make_prompt_dataset(problems, tok, max_prompt_len=9, seed=0)
    for e in next_batch(it, 13):
        rec = problems[e["index"]]
        assert e["answer"] == rec["answer"]
        assert e["prompt_ids"].dtype == np.int32 and len(e["prompt_ids"]) == 9
        np.testing.assert_array_equal(e["prompt_ids"], encode_prompt(tok, rec["prompt"])[-9:])


def test_seeded_shuffle_per_epoch(tok, problems):
    n = len(problems)
    a = _indices(next_batch(make_prompt_dataset(problems, tok, max_prompt_len=64, seed=7), 3 * n))
    b = _indices(next_batch(make_prompt_dataset(problems, tok, max_prompt_len=64, seed=7), 3 * n))
    c = _indices(next_batch(make_prompt_dataset(problems, tok, max_prompt_len=64, seed=8), 3 * n))
    assert a == b and a != c
    epochs = [a[k * n:(k + 1) * n] for k in range(3)]
    assert all(sorted(e) == list(range(n)) for e in epochs)  # each epoch is a permutation
    assert epochs[0] != epochs[1] != epochs[2]                  # reshuffled every epoch
    plain = make_prompt_dataset(problems, tok, max_prompt_len=64, seed=7, shuffle=False)
    assert _indices(next_batch(plain, n + 2)) == list(range(n)) + [0, 1]


@pytest.mark.parametrize("consumed", [0, 5, 13, 20])
def test_state_restore_continues_identically(tok, problems, consumed):
    kw = dict(max_prompt_len=64, seed=3, process_index=1, process_count=2)
    it = make_prompt_dataset(problems, tok, **kw)
    next_batch(it, consumed)
    state = json.loads(json.dumps(it.get_state()))  # must survive JSON
    expected = next_batch(it, 17)
    resumed = make_prompt_dataset(problems, tok, **kw)
    resumed.set_state(state)
    got = next_batch(resumed, 17)
    assert _indices(got) == _indices(expected)
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g["prompt_ids"], e["prompt_ids"])
    # prefetching in a thread does not change the order or the state
    pre = make_prompt_dataset(problems, tok, prefetch=4, **kw)
    pre.set_state(state)
    assert _indices(next_batch(pre, 17)) == _indices(expected)


def test_state_of_another_stream_is_refused(tok, problems):
    it = make_prompt_dataset(problems, tok, max_prompt_len=64, seed=3)
    next(it)
    other = make_prompt_dataset(problems, tok, max_prompt_len=64, seed=4)
    with pytest.raises(ValueError, match="seed"):
        other.set_state(it.get_state())
    changed = make_prompt_dataset(problems[:-1], tok, max_prompt_len=64, seed=3)
    with pytest.raises(ValueError, match="num_records"):
        changed.set_state(it.get_state())


@pytest.mark.parametrize("count", [1, 3, 4])
def test_process_sharding(tok, problems, count):
    n = len(problems)
    # one pass (evaluation): disjoint and covering, even when n % count != 0
    seen = [_indices(next_batch(make_prompt_dataset(problems, tok, max_prompt_len=64, seed=1,
                                                    repeat=False, process_index=p,
                                                    process_count=count), n + 1))
            for p in range(count)]
    flat = [i for s in seen for i in s]
    assert sorted(flat) == list(range(n))
    # training: every process gets the same count per epoch, disjoint within each epoch
    per = n // count
    streams = [_indices(next_batch(make_prompt_dataset(problems, tok, max_prompt_len=64, seed=1,
                                                       process_index=p, process_count=count),
                                   2 * per)) for p in range(count)]
    for epoch in range(2):
        chunk = [i for s in streams for i in s[epoch * per:(epoch + 1) * per]]
        assert len(set(chunk)) == per * count


def test_next_batch_end_of_stream_and_padding(tok, problems):
    it = make_prompt_dataset(problems[:5], tok, max_prompt_len=64, seed=0, repeat=False)
    sizes = [len(next_batch(it, 2)) for _ in range(4)]
    assert sizes == [2, 2, 1, 0]
    batch = [{"prompt_ids": np.array([5, 6, 7], np.int32)}, {"prompt_ids": np.array([9], np.int32)}]
    tokens, lengths = data.stack_prompts(batch, pad_id=0, length=4)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 9]])
    np.testing.assert_array_equal(lengths, [3, 1])


def test_load_eval_set(tmp_path, verl_parquet, tok):
    good = tmp_path / "eval.parquet"
    pq.write_table(pq.read_table(verl_parquet).take([0, 6]), good)
    ev = load_eval_set(good, tokenizer=tok, max_prompt_len=16)
    assert [e["index"] for e in ev] == [0, 1] and [e["answer"] for e in ev] == ["2", "6"]
    np.testing.assert_array_equal(ev[1]["prompt_ids"],
                                  encode_prompt(tok, _chat("What is 2*3?"), max_prompt_len=16))
    with pytest.raises(BadRowError):
        load_eval_set(verl_parquet)


# ----------------------------------------------------------------------------- synthetic

def test_synthetic_tokenizer_roundtrip(tmp_path, tok):
    assert len(tok) < 64
    assert tok.convert_ids_to_tokens(tok("\\boxed{42}", add_special_tokens=False)["input_ids"]) \
        == ["\\boxed{", "4", "2", "}"]
    texts = ["what is 12+7*3?", "12+7*3 -> 12+21 -> 33, \\boxed{33}", SYS, "so\n(1,2): -5/4."]
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == t
    msgs = [{"role": "system", "content": "so"}, {"role": "user", "content": "what is 1-9?"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) \
        == "<bos><|system|>so<|user|>what is 1-9?<|assistant|>"
    tok.save_pretrained(tmp_path / "tok")
    again = load_tokenizer(tmp_path / "tok")
    for t in texts:
        assert again(t, add_special_tokens=False)["input_ids"] == tok(t, add_special_tokens=False)["input_ids"]
    np.testing.assert_array_equal(encode_prompt(again, msgs), encode_prompt(tok, msgs))
    assert (again.pad_token_id, again.bos_token_id, again.eos_token_id) == (0, 1, 2)
    with pytest.raises(FileNotFoundError, match="missing_tok"):
        load_tokenizer(tmp_path / "missing_tok")


def _independent_value(expr):
    # an independent evaluator: split on + and - (outside products), multiply the terms
    total, sign, term = 0, 1, ""
    for ch in expr + "+":
        if ch in "+-" and term:
            prod = 1
            for f in term.split("*"):
                prod *= int(f)
            total, term = total + sign * prod, ""
            sign = 1 if ch == "+" else -1
        else:
            term += ch
    return total


@pytest.mark.parametrize("task", [
    ArithmeticTask(),
    ArithmeticTask(digits=1, ops="*", num_terms=2),
    ArithmeticTask(digits=3, ops=("+", "-", "*"), num_terms=4, reasoning=True, system_prompt=SYS),
])
def test_synthetic_problems_and_reference_reward(tok, task):
    recs = make_problems(40, seed=5, task=task)
    assert recs == make_problems(40, seed=5, task=task)
    assert recs != make_problems(40, seed=6, task=task)
    lo = 10 ** (task.digits - 1) if task.digits > 1 else 0
    for r in recs:
        nums = [int(x) for x in r["expression"].replace("-", "+").replace("*", "+").split("+")]
        assert len(nums) == task.num_terms and all(lo <= x < 10 ** task.digits for x in nums)
        assert set(r["expression"]) - set("0123456789") <= set(task.ops)
        assert int(r["answer"]) == _independent_value(r["expression"])
        ids = encode_prompt(tok, r["prompt"])
        assert tok.unk_token_id not in ids.tolist()
        response = reference_response(r["expression"], reasoning=task.reasoning)
        assert math_reward(response, r["answer"]) == 1.0
        assert math_reward(reference_response(r["expression"]), str(int(r["answer"]) + 1)) == 0.0
    # a supervised example is the chat template of the full conversation
    (p_ids, r_ids), = data.sft_examples(recs[:1], tok, reasoning=task.reasoning)
    conv = recs[0]["prompt"] + [{"role": "assistant",
                                 "content": reference_response(recs[0]["expression"], reasoning=task.reasoning)}]
    full = tok.apply_chat_template(conv, tokenize=True, return_dict=False)
    assert list(p_ids) + list(r_ids) == list(full) and r_ids[-1] == tok.eos_token_id
    assert tok.decode(r_ids, skip_special_tokens=True) == reference_response(
        recs[0]["expression"], reasoning=task.reasoning)


def test_few_shot_prompts_are_solved_examples_in_prose():
    task = ArithmeticTask(digits=1, ops="+", num_terms=3, system_prompt=SYS, few_shot=2)
    recs = make_problems(30, seed=3, task=task)
    other = make_problems(30, seed=4, task=task)
    shots = recs[0]["prompt"][1:5]
    assert [m["role"] for m in recs[0]["prompt"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    # the same two examples in every prompt of every seed (train and held-out see one format)
    assert all(r["prompt"][1:5] == shots for r in recs + other)
    for question, answer in zip(shots[0::2], shots[1::2]):
        expr = question["content"].removeprefix("what is ").removesuffix("?")
        assert math_reward(answer["content"], str(_independent_value(expr))) == 1.0
        a, b, c = (int(x) for x in expr.split("+"))
        assert answer["content"] == (f"We compute one operation at a time. First, {a}+{b} = {a + b}. "
                                     f"Then, {a + b}+{c} = {a + b + c}. The answer is \\boxed{{{a + b + c}}}.")
    # the problems themselves are those of few_shot=0: adding examples does not move the seeds
    plain = make_problems(30, seed=3, task=dataclasses.replace(task, few_shot=0))
    assert [r["expression"] for r in recs] == [r["expression"] for r in plain]
    assert [r["prompt"][-1] for r in recs] == [r["prompt"][-1] for r in plain]
    assert data.prose_response("2*3-1") == ("We compute one operation at a time. First, 2*3 = 6. "
                                            "Then, 6-1 = 5. The answer is \\boxed{5}.")


def test_running_total_examples_add_left_to_right():
    """prose="running_total": the examples keep a running total, one sentence per term; the
    sums in them are right (checked against an independent evaluation) and the problems are
    those of the brief style."""
    task = ArithmeticTask(digits=1, ops="+", num_terms=3, system_prompt=SYS, few_shot=2, prose="running_total")
    recs = make_problems(20, seed=3, task=task)
    brief = make_problems(20, seed=3, task=dataclasses.replace(task, prose="brief"))
    assert [r["prompt"][-1] for r in recs] == [r["prompt"][-1] for r in brief]
    assert recs[0]["prompt"][1:5:2] == brief[0]["prompt"][1:5:2]  # the same example questions
    for question, answer in zip(recs[0]["prompt"][1:5:2], recs[0]["prompt"][2:5:2]):
        expr = question["content"].removeprefix("what is ").removesuffix("?")
        a, b, c = (int(x) for x in expr.split("+"))
        assert answer["content"] == (
            "We add the numbers one at a time and keep a running total. "
            f"The numbers are {a}, {b} and {c}. We start with {a}. "
            f"Next we add {b}: {a} + {b} = {a + b}, so the running total is {a + b}. "
            f"Next we add {c}: {a + b} + {c} = {a + b + c}, so the running total is {a + b + c}. "
            f"All the numbers have been added, so the answer is \\boxed{{{a + b + c}}}.")
        assert math_reward(answer["content"], str(_independent_value(expr))) == 1.0
    # subtraction: the same running total, the steps say so; its box is the expression's value
    text = data.running_total_response("7-9+5")
    assert "Next we subtract 9: 7 - 9 = -2, so the running total is -2." in text
    assert text.startswith("We take the numbers") and math_reward(text, str(_independent_value("7-9+5"))) == 1.0
    with pytest.raises(ValueError, match="left to right"):
        data.running_total_response("2+3*4")
    with pytest.raises(ValueError, match="running_total"):
        ArithmeticTask(ops="+*", prose="running_total")
    with pytest.raises(ValueError, match="prose in"):
        ArithmeticTask(prose="verbose")


def test_synthetic_task_validation():
    with pytest.raises(ValueError):
        ArithmeticTask(few_shot=-1)
    with pytest.raises(ValueError):
        ArithmeticTask(ops=("/",))
    with pytest.raises(ValueError):
        ArithmeticTask(num_terms=1)
    assert data.solve("2+3*4-5")[0] == 9
    # the worked chain reduces one operation at a time in solve's order, and only a running
    # value can go negative (it then leads)
    assert data.worked_steps("2+3*4-5") == ["2+3*4-5", "2+12-5", "14-5", "9"]
    assert data.worked_steps("3-7+5*2") == ["3-7+5*2", "3-7+10", "-4+10", "6"]
    assert data.reference_response("7-3+5", reasoning=True) == "7-3+5 -> 4+5 -> 9, \\boxed{9}"
    for expr in ("1-2*3+4*5", "9-9-9", "2*3*4"):  # every step keeps the value; the last is it
        chain = data.worked_steps(expr)
        assert {_independent_value(e) for e in chain} == {int(chain[-1])} == {_independent_value(expr)}
        assert len(chain) == expr.count("+") + expr.count("-") + expr.count("*") + 1
    assert operator.eq(data.solve("2*3*4")[1], ["2*3=6", "6*4=24"])


# ----------------------------------------------------------------------------- BPE + Qwen-like template

QWEN_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@pytest.fixture(scope="module")
def bpe_tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    corpus = [SYS, "Find the sum of all integer bases b>9 for which 17_b divides 97_b.",
              "Compute \\frac{1}{2} + \\sqrt{2}. The answer is \\boxed{42}."] * 20
    t.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(
        tokenizer_object=t, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        chat_template=QWEN_LIKE_TEMPLATE)


def test_qwen_like_template_thinking_disabled(tmp_path, bpe_tok):
    msgs = _chat("Find the sum of all integer bases b>9. Über-√2?")
    head = f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n{msgs[1]['content']}<|im_end|>\n"
    ids = encode_prompt(bpe_tok, msgs)
    assert bpe_tok.decode(ids) == head + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    thinking = encode_prompt(bpe_tok, msgs, chat_template_kwargs={"enable_thinking": True})
    assert bpe_tok.decode(thinking) == head + "<|im_start|>assistant\n"
    assert data.render_prompt(bpe_tok, msgs) == bpe_tok.decode(ids)
    bpe_tok.save_pretrained(tmp_path / "bpe")
    np.testing.assert_array_equal(encode_prompt(load_tokenizer(tmp_path / "bpe"), msgs), ids)
    # left truncation drops the start and keeps the empty think block the model continues from
    cut = encode_prompt(bpe_tok, msgs, max_prompt_len=12)
    np.testing.assert_array_equal(cut, ids[-12:])
    assert bpe_tok.decode(cut).endswith("<think>\n\n</think>\n\n")
    # a template-free tokenizer cannot encode chat messages
    bare = type(bpe_tok)(tokenizer_object=bpe_tok.backend_tokenizer)
    with pytest.raises(ValueError, match="chat template"):
        encode_prompt(bare, msgs)


# ----------------------------------------------------------------------------- truncation=middle
def test_middle_truncation_keeps_system_prompt_and_question_qwen_template(bpe_tok):
    """Issue 16, finding 8: 'left' cut off the system prompt and the question's start; 'middle'
    keeps the template head (system prompt, user header) and the end (the question, the
    generation prompt) and cuts inside the long user message."""
    passage = "Compute \\frac{1}{2} + \\sqrt{2}. " * 40
    msgs = _chat(passage + "Find the sum of all integer bases b>9.")
    full = encode_prompt(bpe_tok, msgs)
    head = f"<|im_start|>system\n{SYS}<|im_end|>\n<|im_start|>user\n"
    tail = "Find the sum of all integer bases b>9.<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    h = data.template_head_len(bpe_tok, msgs)
    assert bpe_tok.decode(full[:h]) == head  # the template's head, found without parsing the template
    limit = 2 * h + 10
    cut = encode_prompt(bpe_tok, msgs, max_prompt_len=limit, truncation="middle")
    np.testing.assert_array_equal(cut, np.concatenate([full[:h], full[len(full) - (limit - h):]]))
    text = bpe_tok.decode(cut)
    assert len(cut) == limit and text.startswith(head) and text.endswith(tail)
    assert not bpe_tok.decode(encode_prompt(bpe_tok, msgs, max_prompt_len=limit)).startswith("<|im_start|>system")
    # a limit below twice the head: the head is capped at half, the end keeps the other half
    small = encode_prompt(bpe_tok, msgs, max_prompt_len=h, truncation="middle")
    np.testing.assert_array_equal(small, np.concatenate([full[:h // 2], full[len(full) - (h - h // 2):]]))
    # short prompts are untouched; a plain string has no template head ('middle' = 'left')
    np.testing.assert_array_equal(encode_prompt(bpe_tok, msgs, max_prompt_len=len(full), truncation="middle"), full)
    s = encode_prompt(bpe_tok, passage, max_prompt_len=9, truncation="middle")
    np.testing.assert_array_equal(s, encode_prompt(bpe_tok, passage)[-9:])


def test_middle_truncation_in_the_prompt_stream_counts_and_warns(caplog):
    """The tiny tokenizer's own template: the stream cuts in the middle, counts the cut
    prompts and says what the cut kept."""
    import logging
    tok = synthetic_tokenizer()
    recs = [{**r, "prompt": _chat(r["prompt"][-1]["content"])} for r in make_problems(4, seed=0)]
    full = encode_prompt(tok, recs[0]["prompt"])
    h = data.template_head_len(tok, recs[0]["prompt"])
    assert tok.decode(full[:h]) == f"<bos><|system|>{SYS}<|user|>"
    limit = len(full) - 3
    counter = data.CutCounter(truncation="middle")
    with caplog.at_level(logging.WARNING):
        batch = next_batch(make_prompt_dataset(recs, tok, max_prompt_len=limit, seed=0, shuffle=False,
                                               truncation="middle"), 4)
        assert counter.observe(batch) == 4
    first = batch[0]
    assert first["prompt_cut"] == 3 and len(first["prompt_ids"]) == limit
    keep = min(h, limit // 2)
    np.testing.assert_array_equal(first["prompt_ids"], np.concatenate([full[:keep], full[len(full) - (limit - keep):]]))
    assert tok.decode(first["prompt_ids"]).endswith(recs[0]["prompt"][-1]["content"][-8:] + "<|assistant|>")
    assert "lost up to 3 tokens from the middle" in caplog.text
