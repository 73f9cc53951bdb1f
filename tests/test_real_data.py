"""The paper's parquet files through the real code path: sources, template, stream, reward.

The files live outside the repo (../shared/data from the repo root, or $OISD_SHARED_DATA);
without them these tests skip.
"""
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

from oisd_jax.data import (
    DEFAULT_SYSTEM_PROMPT, FieldMap, encode_prompt, load_eval_set, make_prompt_dataset,
    next_batch, read_records, render_prompt)
from oisd_jax.rewards import math_reward, strict_reward

DATA = Path(os.environ.get("OISD_SHARED_DATA",
                           Path(__file__).resolve().parents[2] / "shared" / "data"))
EVAL_SETS = {"aime_2024": 30, "aime_2025": 30, "amc2023": 40, "math500": 500}
TRAIN = "deepmath-5k"

pytestmark = pytest.mark.skipif(
    not (DATA / f"{TRAIN}.parquet").is_file(),
    reason=f"shared data not found at {DATA} (set OISD_SHARED_DATA to the folder of parquet files)")

QWEN_LIKE_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
)


@pytest.fixture(scope="module")
def train_records():
    records, stats = read_records(DATA / f"{TRAIN}.parquet", on_bad_row="error")
    assert stats.num_rows == stats.num_ok == 5000
    return records


@pytest.fixture(scope="module")
def tokenizer(train_records):
    # a byte-level BPE fitted to the real questions, with a Qwen3-style template
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(
        [m["content"] for r in train_records[:500] for m in r["prompt"]],
        trainers.BpeTrainer(vocab_size=1000, show_progress=False,
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=QWEN_LIKE_TEMPLATE)


def _check_chat(prompt):
    assert [m["role"] for m in prompt] == ["system", "user"]
    assert prompt[0]["content"] == DEFAULT_SYSTEM_PROMPT
    assert prompt[1]["content"].strip()


def test_train_set_fields(train_records):
    for r in train_records:
        _check_chat(r["prompt"])
        assert r["answer"]
    # the plain question/final_answer columns describe the same problems
    qa, _ = read_records(DATA / f"{TRAIN}.parquet",
                         FieldMap(prompt=None, question="question", answer="final_answer"),
                         on_bad_row="error")
    assert [r["answer"] for r in qa] == [r["answer"] for r in train_records]
    assert all(a["prompt"][1]["content"].strip() == b["prompt"][1]["content"]
               for a, b in zip(train_records, qa))


@pytest.mark.parametrize("name,count", EVAL_SETS.items())
def test_eval_sets(name, count, tokenizer):
    ev = load_eval_set(DATA / f"{name}.parquet", tokenizer=tokenizer, max_prompt_len=1024)
    assert len(ev) == count and [e["index"] for e in ev] == list(range(count))
    for e in ev:
        _check_chat(e["prompt"])
        text = render_prompt(tokenizer, e["prompt"])
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        if len(e["prompt_ids"]) < 1024:
            assert tokenizer.decode(e["prompt_ids"]) == text
        # the ground truth, boxed, is right for both checkers
        assert math_reward(f"The answer is \\boxed{{{e['answer']}}}.", e["answer"]) == 1.0
        assert strict_reward(f"\\boxed{{{e['answer']}}}", e["answer"]) == 1.0
    if name.startswith("aime"):  # integer answers: a neighbour's different answer is wrong
        for a, b in zip(ev, ev[1:]):
            if int(a["answer"]) != int(b["answer"]):
                assert math_reward(f"\\boxed{{{b['answer']}}}", a["answer"]) == 0.0


def test_train_answers_self_verify(train_records):
    sample = random.Random(0).sample(train_records, 200)
    assert all(math_reward(f"\\boxed{{{r['answer']}}}", r["answer"]) == 1.0 for r in sample)


def test_train_stream_sharded_and_resumable(train_records, tokenizer):
    kw = dict(max_prompt_len=256, seed=0, process_count=2)
    streams = [make_prompt_dataset(train_records, tokenizer, process_index=p, **kw) for p in range(2)]
    first = [next_batch(s, 64) for s in streams]
    assert not {e["index"] for e in first[0]} & {e["index"] for e in first[1]}
    for e in first[0]:
        assert e["prompt_ids"].dtype == np.int32 and len(e["prompt_ids"]) <= 256
        np.testing.assert_array_equal(
            e["prompt_ids"], encode_prompt(tokenizer, train_records[e["index"]]["prompt"])[-256:])
        assert e["answer"] == train_records[e["index"]]["answer"]
    state = json.dumps(streams[0].get_state())
    expected = [e["index"] for e in next_batch(streams[0], 32)]
    resumed = make_prompt_dataset(train_records, tokenizer, process_index=0, **kw)
    resumed.set_state(json.loads(state))
    assert [e["index"] for e in next_batch(resumed, 32)] == expected
