"""Dataset loaders on the real local data (../shared/data or $QWEN3_DATA_DIR), and the offline-Hub error."""
import json, os
from pathlib import Path

import pytest

pytest.importorskip("datasets", reason="the loaders need the `datasets` package: pip install datasets")
from qwen3_scratch.data.formatting import IGNORE_INDEX, BadRowCounter
from qwen3_scratch.data.hf_datasets import (DATA_DIR_ENV, SOURCES, interleave, load_dpo_dataset, load_grpo_dataset,
                                            load_pretrain_dataset, load_sft_dataset, raw_rows)
from qwen3_scratch.data.tokenizer import Tokenizer

DATA = Path(os.environ.get(DATA_DIR_ENV) or Path(__file__).resolve().parents[2]/"shared"/"data")
need_data = pytest.mark.skipif(not (DATA/"math"/"gsm8k_test.jsonl").exists(),
                               reason=f"no local test data at {DATA}: set {DATA_DIR_ENV} to a folder like ../shared/data")

@pytest.fixture(scope="module")
def tok(): return Tokenizer()

@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)

@pytest.mark.parametrize("call", [
    lambda tok: raw_rows("fineweb"),
    lambda tok: load_pretrain_dataset("general", tok, 128),
    lambda tok: load_sft_dataset("math", tok, 128),
    lambda tok: load_grpo_dataset(10),
    lambda tok: load_dpo_dataset(tok, 128),
])
def test_offline_hub_without_data_files_names_the_override(offline, tok, call):
    with pytest.raises(ConnectionError, match="data_files") as e: call(tok)
    assert DATA_DIR_ENV in str(e.value) and "offline" in str(e.value)

@need_data
def test_grpo_from_local_gsm8k(offline):
    c = BadRowCounter("gsm8k")
    qs = list(load_grpo_dataset(data_files=DATA/"math"/"gsm8k_test.jsonl", counter=c))
    assert len(qs) == 1319 and c.n_bad == 0
    assert all(set(q) == {"prompt", "answer"} and q["prompt"] and q["answer"] for q in qs)
    assert qs[0]["answer"] == "18"
    assert len(list(load_grpo_dataset(5, data_dir=DATA))) == 5   # gsm8k_train via the data dir, MATH left out

@need_data
def test_grpo_bad_rows_counted(tmp_path):
    f = tmp_path/"bad.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [{"question": "q1", "answer": "x\n#### 3"}, {"question": "q2", "answer": "no marker"},
                                                     {"question": "", "answer": "#### 1"}, {"question": "q4", "answer": "#### 1,250.00"}]))
    c = BadRowCounter("bad")
    qs = list(load_grpo_dataset(data_files=f, counter=c))
    assert [q["answer"] for q in qs] == ["3", "1250"] and c.n_bad == 2

@need_data
def test_sft_from_local_sharegpt_and_self_instruct(offline, tok):
    sg = json.load(open(DATA/"sft"/"sharegpt_dummy_conversation.json"))
    exs = list(load_sft_dataset("sharegpt", tok, 4096, data_dir=DATA))
    assert len(exs) == len(sg) == 500
    for ex, s in zip(exs[:50], sg):   # streaming keeps the file order for a single source
        labelled = tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])
        replies = [t["value"] for t in s["conversations"] if t["from"] == "gpt"]
        assert labelled == "<|im_end|>".join(replies[:-1] + ["<think>\n\n</think>\n\n" + replies[-1]]) + "<|im_end|>"
    c = BadRowCounter("self-instruct")
    exs = list(load_sft_dataset("self_instruct", tok, 1024, data_files=DATA/"sft"/"self_instruct_seed_tasks.jsonl", counter=c))
    assert len(exs) == 174 and c.n_bad == 1   # one task is longer than 1024 tokens
    assert all(len(e["input_ids"]) == len(e["labels"]) <= 1024 for e in exs)
    assert len(list(load_sft_dataset("sharegpt", tok, 256, max_samples=7, data_dir=DATA))) == 7

@need_data
def test_pretrain_from_local_text(offline, tok):
    blocks = list(load_pretrain_dataset("tinyshakespeare", tok, 4096, data_dir=DATA, max_samples=20))
    assert len(blocks) == 20 and all(len(b["input_ids"]) == 4096 for b in blocks)
    text = (DATA/"pretrain"/"tinyshakespeare.txt").read_text()
    assert blocks[0]["input_ids"] == tok.encode(text[:20000], allowed_special=())[:4096]
    # the directory form: both books, EOS after each
    ids = [i for b in load_pretrain_dataset("long", tok, 8192, data_files=DATA/"pretrain") for i in b["input_ids"]]
    assert 1 <= ids.count(tok.eos_id) <= 2   # the last partial block is dropped
    assert list(load_pretrain_dataset("s3", tok, 64, data_dir=DATA, max_samples=2))   # S3 = PG-19 -> the local book

@need_data
def test_dpo_from_local_hh_rlhf(offline, tok):
    c = BadRowCounter("hh")
    pairs = list(load_dpo_dataset(tok, 1024, data_dir=DATA, tokenize=False, counter=c))
    assert len(pairs) == 2308 and c.n_bad == 4 and c.good == 2308
    assert all(set(p) == {"prompt", "chosen", "rejected"} for p in pairs)
    exs = list(load_dpo_dataset(tok, 1024, data_dir=DATA, max_samples=20))
    for e in exs:
        for k in ("chosen", "rejected"):
            ids, labels = e[f"{k}_input_ids"], e[f"{k}_labels"]
            assert len(ids) == len(labels) and any(l != IGNORE_INDEX for l in labels) and labels[0] == IGNORE_INDEX

def test_ultrafeedback_schema_from_local_file(tmp_path, tok):
    rows = [{"source": "evol", "instruction": f"Q{i}", "models": ["a", "b"],
             "completions": [{"model": "a", "response": f"good {i}", "overall_score": 9.0},
                             {"model": "b", "response": f"bad {i}", "overall_score": 3.0}]} for i in range(5)]
    rows.append({"source": "evol", "instruction": "tie", "completions": [{"response": "x", "overall_score": 5.0}] * 2})
    f = tmp_path/"uf.jsonl"; f.write_text("\n".join(map(json.dumps, rows)))
    c = BadRowCounter("uf")
    pairs = list(load_dpo_dataset(tok, 256, data_files=f, tokenize=False, counter=c))
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(f"good {i}", f"bad {i}") for i in range(5)] and c.n_bad == 1

def test_interleave_is_deterministic_and_weighted():
    mk = lambda: {"a": range(3000), "b": range(10_000, 10_300)}
    x = list(interleave(mk(), {"a": 0.75, "b": 0.25}, seed=7))
    assert x == list(interleave(mk(), {"a": 0.75, "b": 0.25}, seed=7)) != list(interleave(mk(), {"a": 0.75, "b": 0.25}, seed=8))
    assert sorted(x) == sorted(list(range(3000)) + list(range(10_000, 10_300)))
    assert 0.18 < sum(v >= 10_000 for v in x[:800]) / 800 < 0.32

def test_unknown_names_and_missing_files(tmp_path, tok):
    with pytest.raises(ValueError, match="unknown pretraining stage"): load_pretrain_dataset("nope", tok, 8)
    with pytest.raises(ValueError, match="unknown SFT variant"): load_sft_dataset("nope", tok, 8)
    with pytest.raises(FileNotFoundError, match="matches no file"): load_grpo_dataset(data_files=tmp_path/"none.jsonl")
    with pytest.raises(FileNotFoundError, match="has a local file"): load_sft_dataset("math", tok, 8, data_dir=tmp_path)
    assert all(s.hub_id.count("/") == 1 for s in SOURCES.values())


# ---- multimodal SFT (LLaVA-Instruct-150K schema) ----
from qwen3_scratch.data.hf_datasets import load_multimodal_dataset, llava_messages

def _llava_files(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    for name, color in (("a.png", "red"), ("b.png", "blue")): Image.new("RGB", (8, 6), color).save(tmp_path/name)
    human = lambda v: {"from": "human", "value": v}
    gpt = lambda v: {"from": "gpt", "value": v}
    rows = [{"id": "1", "image": "a.png", "conversations": [human("<image>\nWhat colour?"), gpt("Red."), human("Sure?"), gpt("Yes.")]},
            {"id": "2", "image": ["a.png", "b.png"], "conversations": [human("<image> and <image>: same?"), gpt("No.")]},
            {"id": "3", "image": "gone.png", "conversations": [human("<image>\nHi"), gpt("x")]},              # missing file
            {"id": "4", "image": "b.png", "conversations": [human("no tag"), gpt("x")]},                      # 0 tags, 1 image
            {"id": "5", "image": "a.png", "conversations": [human("<image><image> two?"), gpt("x")]},         # 2 tags, 1 image
            {"id": "6", "image": "b.png", "conversations": []},                                                # empty
            {"id": "7", "image": "b.png"},                                                                     # no conversations
            {"id": "8", "conversations": [human("text only"), gpt("Fine.")]}]                                 # no image: text-only
    f = tmp_path/"llava.jsonl"; f.write_text("\n".join(map(json.dumps, rows)))
    return f, rows

def test_multimodal_llava_schema_labels_and_bad_rows(tmp_path, tok):
    f, rows = _llava_files(tmp_path)
    c = BadRowCounter("llava")
    exs = list(load_multimodal_dataset(tok, 512, data_files=f, image_root=tmp_path, counter=c))
    assert len(exs) == 3 and c.good == 3 and c.n_bad == 5
    assert c.bad["missing image file"] == 1 and c.bad["<image> count differs from the number of images"] == 2
    assert c.bad["no conversations"] == 2
    pad, vs, ve = (tok.token_to_id(t) for t in ("<|image_pad|>", "<|vision_start|>", "<|vision_end|>"))
    for ex, row in zip(exs, [rows[0], rows[1], rows[7]]):
        assert set(ex) == {"input_ids", "labels", "images"} and len(ex["input_ids"]) == len(ex["labels"])
        n_img = len(row["image"]) if isinstance(row.get("image"), list) else int("image" in row)
        assert ex["input_ids"].count(pad) == ex["input_ids"].count(vs) == ex["input_ids"].count(ve) == len(ex["images"]) == n_img
        assert all(l == IGNORE_INDEX for i, l in zip(ex["input_ids"], ex["labels"]) if i == pad)   # image tokens are never targets
        labelled = tok.decode([i for i, l in zip(ex["input_ids"], ex["labels"]) if l != IGNORE_INDEX])
        replies = [t["value"] for t in row["conversations"] if t["from"] == "gpt"]
        assert labelled == "<|im_end|>".join(replies[:-1] + ["<think>\n\n</think>\n\n" + replies[-1]]) + "<|im_end|>"
    assert exs[0]["images"] == [str(tmp_path/"a.png")] and exs[1]["images"] == [str(tmp_path/"a.png"), str(tmp_path/"b.png")]
    assert exs[2]["images"] == []
    assert "<image>" not in tok.decode(exs[0]["input_ids"])
    assert len(list(load_multimodal_dataset(tok, 512, data_files=f, image_root=tmp_path, max_samples=2))) == 2
    # a placeholder cut by max_seq_len is a bad row, not a sample whose image count is wrong
    c = BadRowCounter("short")
    short = list(load_multimodal_dataset(tok, 4, data_files=f, image_root=tmp_path, counter=c))
    assert all(e["input_ids"].count(pad) == len(e["images"]) for e in short)

def test_multimodal_embedded_bytes_become_pil(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    import io
    buf = io.BytesIO(); Image.new("RGB", (4, 4), "green").save(buf, format="PNG")
    row = {"image": {"bytes": buf.getvalue(), "path": None},
           "conversations": [{"from": "human", "value": "<image>\nColour?"}, {"from": "gpt", "value": "Green."}]}
    msgs, images, err = llava_messages(row)
    assert err is None and len(images) == 1 and images[0].size == (4, 4)
    assert msgs[0] == {"role": "user", "content": "<|vision_start|><|image_pad|><|vision_end|>\nColour?"}
    assert llava_messages({"image": {"bytes": b"not a png"}, "conversations": row["conversations"]})[2] == "undecodable image bytes"

def test_multimodal_offline_hub_without_data_files(offline, tok):
    with pytest.raises(ConnectionError, match="data_files") as e: load_multimodal_dataset(tok, 128)
    assert DATA_DIR_ENV in str(e.value) and "offline" in str(e.value) and "LLaVA-Instruct-150K" in str(e.value)
