"""PackedTextDataset: text -> uint32 shards -> windows round trip, document boundaries, errors, resumable tokenisation."""
import os, shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3_scratch.data.dataset import PackedTextDataset, split_documents, tokenize_to_shards
from qwen3_scratch.data.tokenizer import Tokenizer
from qwen3_scratch.model.attention import document_ids

DATA = Path(os.environ.get("QWEN3_DATA_DIR") or Path(__file__).resolve().parents[2]/"shared"/"data")
SHAKESPEARE = DATA/"pretrain"/"tinyshakespeare.txt"
EOS = "<|endoftext|>"
DOCS = ["Hello world", "The quick brown fox.\n", "Ünïcödé ✓ and 漢字 " * 3, "a", "<|endoftext|> is text here",
        "x y z " * 20, "last one"]


@pytest.fixture(scope="module")
def tok(): return Tokenizer()


@pytest.fixture(scope="module")
def toy(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    return out, tokenize_to_shards(DOCS, out, tok, shard_chars=40, progress=False)


def _stream(ds):
    "All tokens of an unshuffled dataset's windows, in order."
    return torch.cat([ds[i]["input_ids"] for i in range(len(ds))] + [ds[len(ds) - 1]["labels"][-1:]])


@pytest.mark.parametrize("L", [1, 5, 16])
def test_round_trip_and_boundaries(tok, toy, L):
    out, meta = toy
    assert len(meta["shards"]) > 2 and meta["n_docs"] == len(DOCS)
    ds = PackedTextDataset(out, L, tok, shuffle=False)
    assert len(ds) == (meta["n_tokens"] - 1) // L
    ids = _stream(ds).tolist()
    expected = [i for d in DOCS for i in tok.encode(d, allowed_special="none") + [tok.eos_id]]
    assert ids == expected[:len(ids)] and len(expected) - len(ids) < L
    assert tok.decode(expected) == EOS.join(DOCS) + EOS
    for i in range(len(ds)):
        b = ds[i]
        assert b["input_ids"].dtype == torch.long and b["input_ids"].shape == (L,) == b["labels"].shape
        assert torch.equal(b["labels"][:-1], b["input_ids"][1:])
        cu = b["cu_seqlens"].tolist()
        assert cu == [0] + [p + 1 for p in range(L - 1) if b["input_ids"][p] == tok.eos_id] + [L]
    batch = [ds[i] for i in range(min(3, len(ds)))]
    cu = torch.cat([torch.zeros(1, dtype=torch.int32)] + [b["cu_seqlens"][1:] + j * L for j, b in enumerate(batch)])
    doc, pos = document_ids(cu, len(batch), L)
    assert (pos[:, 0] == 0).all()


def test_shuffle_deterministic(tok, toy):
    out, _ = toy
    a, b, c = (PackedTextDataset(out, 4, tok, seed=s) for s in (1, 1, 2))
    seq = lambda d: [d[i]["input_ids"].tolist() for i in range(len(d))]
    assert seq(a) == seq(b) and seq(a) != seq(c)
    plain = PackedTextDataset(out, 4, tok, shuffle=False)
    assert sorted(seq(a)) == sorted(seq(plain))


def test_errors(tok, toy, tmp_path):
    out, _ = toy
    with pytest.raises(ValueError, match="fingerprint.*overwrite=True"):
        PackedTextDataset(out, 4, "0" * 64)
    bad = tmp_path/"bad"; shutil.copytree(out, bad)
    with open(bad/"shard_00001.bin", "r+b") as f: f.truncate(4)
    with pytest.raises(ValueError, match="corrupt or truncated.*overwrite=True"):
        PackedTextDataset(bad, 4, tok)
    (bad/"shard_00001.bin").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        PackedTextDataset(bad, 4, tok)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        PackedTextDataset(tmp_path/"none", 4, tok)
    with pytest.raises(ValueError, match="fewer than one window"):
        PackedTextDataset(out, 10_000, tok)
    with pytest.raises(ValueError, match="other settings.*overwrite=True"):
        tokenize_to_shards(DOCS, out, tok, shard_chars=41, progress=False)
    # overwrite=True rebuilds the folder with the new settings
    meta = tokenize_to_shards(DOCS, bad, tok, shard_chars=1000, overwrite=True, progress=False)
    assert len(meta["shards"]) == 1 and len(list(bad.glob("shard_*.bin"))) == 1


def test_resume_interrupted(tok, toy, tmp_path):
    out, meta = toy
    part = tmp_path/"part"; shutil.copytree(out, part)
    # interrupted while writing shard 2: its .bin was being written under .tmp; shards 0, 1 and 3 are complete
    for n in ("metadata.json", "shard_00002.json", "shard_00002.idx.npy", "shard_00002.bin"): (part/n).unlink()
    (part/"shard_00002.bin.tmp").write_bytes(b"\1" * 10)
    with pytest.raises(FileNotFoundError, match="did not finish"):
        PackedTextDataset(part, 4, tok)
    stamps = {p.name: p.stat().st_mtime_ns for p in part.glob("shard_*.bin")}
    meta2 = tokenize_to_shards(DOCS, part, tok, shard_chars=40, num_proc=2, progress=False)
    assert meta2 == meta
    assert {p.name: p.stat().st_mtime_ns for p in part.glob("shard_*.bin") if p.name in stamps} == stamps
    assert (part/"shard_00002.bin").read_bytes() == (out/"shard_00002.bin").read_bytes()
    assert not list(part.glob("*.tmp"))
    assert _stream(PackedTextDataset(part, 4, tok, shuffle=False)).tolist() == \
        _stream(PackedTextDataset(out, 4, tok, shuffle=False)).tolist()


def test_files_and_blank_lines(tok, tmp_path):
    (tmp_path/"a.txt").write_text("first para\n\nsecond para\n")
    (tmp_path/"b.txt").write_text("whole file\n\nstays one doc")
    m1 = tokenize_to_shards([tmp_path/"a.txt", tmp_path/"b.txt"], tmp_path/"s1", tok, progress=False)
    m2 = tokenize_to_shards([tmp_path/"a.txt"], tmp_path/"s2", tok, split_blank_lines=True, progress=False)
    assert (m1["n_docs"], m2["n_docs"]) == (2, 2)


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} is absent: set QWEN3_DATA_DIR to the shared data folder")
def test_real_text_round_trip(tok, tmp_path):
    text = SHAKESPEARE.read_text()
    meta = tokenize_to_shards([SHAKESPEARE], tmp_path/"sh", tok, split_blank_lines=True, shard_chars=250_000,
                              num_proc=2, progress=False)
    docs = split_documents(text)
    assert meta["n_docs"] == len(docs) and len(meta["shards"]) >= 4
    ds = PackedTextDataset(tmp_path/"sh", 2048, tok, shuffle=False)
    decoded = tok.decode(_stream(ds).tolist())
    src = EOS.join(docs) + EOS
    assert src.startswith(decoded) and len(src) - len(decoded) < 2048 * 20
    ids = _stream(ds)
    ends = ds.doc_ends[ds.doc_ends <= len(ids)]
    assert (ids[ends - 1] == tok.eos_id).all() and int((ids == tok.eos_id).sum()) == len(ends)
