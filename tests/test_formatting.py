"""Formatting on the real local data (../shared/data or $QWEN3_DATA_DIR): SFT masks, GSM8K/boxed answers, DPO pairs, bad rows."""
import gzip, json, os
from pathlib import Path

import pytest

from qwen3_scratch.data.formatting import (IGNORE_INDEX, BadRowCounter, answers_match, chat_segments, extract_boxed,
                                           extract_gsm8k_answer, hh_rlhf_pair, long_cot_messages, normalize_answer,
                                           pretrain_blocks, sft_example, ultrafeedback_pair, fuse_thinking_modes)
from qwen3_scratch.data.tokenizer import Tokenizer, render_qwen3_chat

DATA = Path(os.environ.get("QWEN3_DATA_DIR") or Path(__file__).resolve().parents[2]/"shared"/"data")
need_data = pytest.mark.skipif(not (DATA/"math"/"gsm8k_test.jsonl").exists(),
                               reason=f"no local test data at {DATA}: set QWEN3_DATA_DIR to a folder like ../shared/data")

@pytest.fixture(scope="module")
def tok(): return Tokenizer()

def labelled_runs(ex):
    "Contiguous runs of labelled ids."
    runs, cur = [], []
    for i, l in zip(ex["input_ids"], ex["labels"]):
        if l != IGNORE_INDEX: assert l == i; cur.append(i)
        elif cur: runs.append(cur); cur = []
    return runs + ([cur] if cur else [])

def sharegpt_messages():
    roles = {"human": "user", "gpt": "assistant"}
    return [[{"role": roles[t["from"]], "content": t["value"]} for t in s["conversations"]]
            for s in json.load(open(DATA/"sft"/"sharegpt_dummy_conversation.json"))]

@need_data
def test_sft_masks_cover_exactly_the_assistant_tokens(tok):
    n = 0
    for msgs in sharegpt_messages():
        ex = sft_example(msgs, tok, 100_000)
        assert len(ex["input_ids"]) == len(ex["labels"])
        assert tok.decode(ex["input_ids"]) == render_qwen3_chat(msgs)
        bodies = [t for t, lab in chat_segments(msgs) if lab]
        assert [tok.decode(r) for r in labelled_runs(ex)] == bodies
        # the bodies are the assistant contents (the last one in the template's empty-think form) + <|im_end|>
        contents = [m["content"] for m in msgs if m["role"] == "assistant"]
        expect = [c + "<|im_end|>" for c in contents[:-1]] + ["<think>\n\n</think>\n\n" + contents[-1] + "<|im_end|>"]
        assert bodies == expect
        # unlabelled: every header and user turn
        masked = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l == IGNORE_INDEX]
        assert masked.count(tok.im_start_id) == len(msgs)
        n += 1
    assert n == 500

def test_long_cot_and_truncation(tok):
    cot = long_cot_messages("Q", "think hard", "A")
    ex = sft_example(cot, tok, 4096)
    assert [tok.decode(r) for r in labelled_runs(ex)] == ["<think>\nthink hard\n</think>\n\nA<|im_end|>"]
    assert sft_example(cot, tok, 3) is None
    mix = list(fuse_thinking_modes([cot] * 50, [cot] * 50, ratio=0.5, seed=0))
    off = [x for x in mix if not x["enable_thinking"]]
    assert off and all(x["messages"][-1]["content"] == "<think>\n\n</think>\n\nA" for x in off)

@need_data
def test_gsm8k_answers_all_parse():
    rows = [json.loads(l) for l in open(DATA/"math"/"gsm8k_test.jsonl")]
    assert len(rows) == 1319
    for r in rows:
        a = extract_gsm8k_answer(r["answer"])
        assert a is not None, r["answer"]
        float(eval(a)) if "/" in a else int(a)   # every answer is a number
        assert answers_match(r["answer"].rsplit("####", 1)[1], a)

@pytest.mark.parametrize("text,expected", [
    (r"\boxed{5}", "5"),
    (r"so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
    (r"\boxed{\left\{ x \mid x^{2} > 1 \right\}}", r"\left\{ x \mid x^{2} > 1 \right\}"),
    (r"first \boxed{1}, finally \boxed{2\sqrt{3}}", r"2\sqrt{3}"),
    (r"\boxed{ \text{(B)} }", r"\text{(B)}"),
    (r"\fbox{x}", "x"),
    (r"\boxed 7", "7"),
    (r"\boxed{broken {", None),
    (r"\boxed{}", None),
    ("no box", None),
    (None, None),
])
def test_extract_boxed(text, expected): assert extract_boxed(text) == expected

@pytest.mark.parametrize("a,b", [("1,000", "1000"), ("$5", "5"), ("5.0", "5"), (r"\frac{3}{4}", "3/4"),
                                 (r"\dfrac{6}{8}", "0.75"), (" 42 ", "42"), (r"10\%", r"10\%"), ("-0.50", "-1/2")])
def test_normalize_answer(a, b): assert normalize_answer(a) == normalize_answer(b)

def test_normalize_empty(): assert normalize_answer("  ") is None and normalize_answer(None) is None

@need_data
def test_hh_rlhf_pairs_parse():
    c = BadRowCounter("hh")
    pairs = [hh_rlhf_pair(r["chosen"], r["rejected"], c) for r in map(json.loads, gzip.open(DATA/"preference"/"hh_rlhf_harmless_test.jsonl.gz", "rt"))]
    good = [p for p in pairs if p is not None]
    assert len(pairs) == 2312 and c.good == len(good) and c.good + c.n_bad == 2312
    assert len(good) == 2308 and c.n_bad == 4, c.summary()   # 4 rows have an empty reply
    for p in good:
        assert p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"]
        assert all(m["role"] == ("user" if i % 2 == 0 else "assistant") for i, m in enumerate(p["prompt"]))

def test_ultrafeedback_pair():
    row = {"source": "sharegpt", "instruction": "Say hi", "models": ["a", "b", "c"],
           "completions": [{"model": "a", "response": "hi!", "overall_score": 8.5, "fine-grained_score": 4.75},
                           {"model": "b", "response": "no", "overall_score": 2, "fine-grained_score": 1.25},
                           {"model": "c", "response": "hello", "overall_score": 6, "fine-grained_score": 5.0}]}
    p = ultrafeedback_pair(row, seed=0)
    assert p["prompt"] == [{"role": "user", "content": "Say hi"}] and p["chosen"] == "hi!" and p["rejected"] in ("no", "hello")
    assert ultrafeedback_pair(row, score="fine-grained_score")["chosen"] == "hello"
    assert ultrafeedback_pair(row, seed=1) == ultrafeedback_pair(dict(row), seed=1)

def test_bad_rows_are_counted_not_raised(tok):
    c = BadRowCounter("mixed")
    assert hh_rlhf_pair(None, "x", c) is None
    assert hh_rlhf_pair("\n\nHuman: a\n\nAssistant: b", "\n\nHuman: a\n\nAssistant: b", c) is None
    assert hh_rlhf_pair("\n\nHuman: a", "\n\nHuman: a", c) is None
    assert ultrafeedback_pair({"instruction": "", "completions": []}, counter=c) is None
    assert ultrafeedback_pair({"instruction": "q", "completions": [{"response": "r", "overall_score": "n/a"}]}, counter=c) is None
    blocks = list(pretrain_blocks(["ok text", "", None, b"\xff", "more"], tok, 4, counter=c, drop_last=False))
    assert sum(len(b["input_ids"]) for b in blocks) == len(tok.encode("ok text")) + len(tok.encode("more")) + 2
    assert c.n_bad == 8 and c.good == 2
    s = c.summary()
    assert "8 skipped" in s and "empty or undecodable text: 3" in s
