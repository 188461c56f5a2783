"""Collators: packed windows -> one batch cu_seqlens (model equivalence), pad/pack, SFT shift + loss, DPO rows, image token expansion."""
import pytest
import torch
import torch.nn.functional as F

from qwen3_scratch.data.collator import (IMAGE_PAD_ID, PAD_ID, DPOCollator, MultimodalCollator, SFTCollator, TextCollator,
                                         batch_cu_seqlens, first_fit, shift_labels)
from qwen3_scratch.data.dataset import PackedTextDataset, tokenize_to_shards
from qwen3_scratch.data.formatting import dpo_example, sft_example
from qwen3_scratch.data.tokenizer import Tokenizer
from qwen3_scratch.model.attention import document_ids
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model

CFG = ModelConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, intermediate_size=48, kernels="torch")


@pytest.fixture(scope="module")
def tok(): return Tokenizer()


def model(cfg=CFG):
    torch.manual_seed(0)
    return Qwen3Model(cfg).eval()


def test_batch_cu_seqlens_and_first_fit():
    assert batch_cu_seqlens([[0, 3, 8], [0, 2, 8]], 8).tolist() == [0, 3, 8, 10, 16]
    assert batch_cu_seqlens([[0, 8]] * 3, 8).tolist() == [0, 8, 16, 24]
    with pytest.raises(ValueError, match="rise from 0"): batch_cu_seqlens([[0, 9]], 8)
    assert first_fit([5, 3, 4, 2, 1], 8) == [[0, 1], [2, 3, 4]]
    with pytest.raises(ValueError, match="split it first"): first_fit([9], 8)


def test_windows_from_packed_dataset(tok, tmp_path):
    docs = ["The quick brown fox.", "Packing puts documents side by side.", "Hi!", "A short one."] * 4
    tokenize_to_shards(docs, tmp_path, tok, progress=False)
    ds = PackedTextDataset(tmp_path, max_seq_len=12, tokenizer=tok, shuffle=False)
    ex = [ds[i] for i in range(5)]                               # odd batch size
    b = TextCollator()(ex)
    assert b["input_ids"].shape == b["labels"].shape == (5, 12) and b["cu_seqlens"].dtype == torch.int32
    doc, pos = document_ids(b["cu_seqlens"], 5, 12)              # the model's own check accepts it
    for i, e in enumerate(ex):                                   # and it is each window's boundaries, offset
        cu = e["cu_seqlens"].tolist()
        assert set(c + 12 * i for c in cu) <= set(b["cu_seqlens"].tolist())
        assert (pos[i] == torch.cat([torch.arange(y - x) for x, y in zip(cu[:-1], cu[1:])])).all()
    m = TextCollator(mask_document_ends=True)(ex)["labels"]
    assert ((m == -100) == (b["input_ids"] == tok.eos_id)).all()
    assert (TextCollator()(ex)["labels"] == torch.stack([e["labels"] for e in ex])).all()   # default keeps them


def test_packed_batch_equals_documents_alone():
    g = torch.Generator().manual_seed(3)
    docs = [torch.randint(1, 97, (n,), generator=g) for n in (7, 3, 11, 5, 2, 9, 13)]
    b = TextCollator(pad_id=0, mode="pack", max_seq_len=16)(docs)
    m = model()
    with torch.no_grad():
        out = m(b["input_ids"], labels=b["labels"], cu_seqlens=b["cu_seqlens"])
        flat, ids, cu = out.logits.flatten(0, 1), b["input_ids"].flatten(), b["cu_seqlens"].tolist()
        seen = 0
        for d in docs:
            for a, e in zip(cu[:-1], cu[1:]):
                if e - a == len(d) and (ids[a:e] == d).all():
                    torch.testing.assert_close(flat[a:e], m(d[None]).logits[0], atol=1e-5, rtol=1e-5); seen += 1; break
        assert seen == len(docs)
        ref = sum(F.cross_entropy(m(d[None]).logits[0, :-1], d[1:], reduction="sum") for d in docs)
        torch.testing.assert_close(out.loss, ref / sum(len(d) - 1 for d in docs), atol=1e-5, rtol=1e-5)


def test_pad_and_pack_token_lists():
    b = TextCollator(pad_id=0, pad_to_multiple_of=8)([[1, 2, 3], list(range(1, 10)), {"input_ids": [5]}])
    assert b["input_ids"].shape == (3, 16) and b["attention_mask"].sum(1).tolist() == [3, 9, 1]
    assert b["labels"][0, :3].tolist() == [2, 3, -100] and (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert (b["labels"][2] == -100).all()                        # a one-token document has no target
    p = TextCollator(pad_id=0, mode="pack", max_seq_len=4)([list(range(1, 11)), [20, 21], [30]])
    assert p["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 20, 21], [30, 0, 0, 0]]
    assert p["cu_seqlens"].tolist() == [0, 4, 8, 10, 12, 13, 16]
    assert (p["labels"][3] == -100).all()
    with pytest.raises(ValueError, match="needs max_seq_len"): TextCollator(mode="pack")
    with pytest.raises(KeyError, match="input_ids"): TextCollator()([{"ids": [1]}])
    with pytest.raises(ValueError, match="one length"):
        TextCollator()([{"input_ids": torch.ones(4), "labels": torch.ones(4), "cu_seqlens": [0, 4]},
                        {"input_ids": torch.ones(3), "labels": torch.ones(3), "cu_seqlens": [0, 3]}])


CHATS = [[{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
          {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green."}],
         [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]]


def test_sft_shift_padding_and_errors(tok):
    exs = [sft_example(c, tok, 256) for c in CHATS]
    b = SFTCollator(pad_to_multiple_of=8)(exs)
    assert b["input_ids"].shape[1] % 8 == 0
    for i, e in enumerate(exs):
        n = len(e["input_ids"])
        assert b["labels"][i, :n - 1].tolist() == e["labels"][1:] and (b["labels"][i, n - 1:] == -100).all()
        assert b["attention_mask"][i].sum() == n and (b["input_ids"][i, n:] == PAD_ID).all()
    empty = {"input_ids": [1, 2, 3], "labels": [-100] * 3}        # empty-label row: kept, adds nothing
    b = SFTCollator(max_seq_len=5)([exs[0], empty])
    assert b["input_ids"].shape == (2, 5) and (b["labels"][1] == -100).all()
    assert b["labels"][0].tolist() == exs[0]["labels"][1:6]        # shift, then cut at the right
    with pytest.raises(ValueError, match="shifted already"): SFTCollator()([{"input_ids": [1, 2, 3], "labels": [2, 3, -100]}])
    with pytest.raises(KeyError, match="labels"): SFTCollator()([{"input_ids": [1]}])
    with pytest.raises(ValueError, match="differ in length"): SFTCollator()([{"input_ids": [1, 2], "labels": [1]}])


def test_sft_loss_is_cross_entropy_over_assistant_tokens(tok):
    exs = [sft_example(c, tok, 256) for c in CHATS]
    vocab = {t: i for i, t in enumerate(sorted({t for e in exs for t in e["input_ids"]} | {PAD_ID}))}
    small = [{"input_ids": [vocab[t] for t in e["input_ids"]], "labels": [vocab.get(t, -100) for t in e["labels"]]} for e in exs]
    m = model(CFG.replace(vocab_size=len(vocab)))
    b = SFTCollator(pad_id=vocab[PAD_ID])(small)
    with torch.no_grad():
        loss = m(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        terms = []
        for e, raw in zip(small, exs):
            logp = m(torch.tensor([e["input_ids"]])).logits[0].log_softmax(-1)
            terms += [-logp[t - 1, e["input_ids"][t]] for t in range(1, len(raw["labels"])) if raw["labels"][t] != -100]
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_dpo_rows_masks_and_index(tok):
    pairs = [{"prompt": [{"role": "user", "content": "Capital of France?"}], "chosen": "Paris.", "rejected": "London, maybe."},
             {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": "4", "rejected": "5"},
             {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Hello!", "rejected": "Go away."}]
    exs = [dpo_example(p, tok, 256) for p in pairs]
    b = DPOCollator(pad_to_multiple_of=8)(exs)
    assert b["input_ids"].shape[0] == 6 and b["input_ids"].shape[1] % 8 == 0
    assert b["chosen_index"].tolist() == [0, 1, 2] and b["rejected_index"].tolist() == [3, 4, 5]
    for i, e in enumerate(exs):
        for r, k in ((b["chosen_index"][i], "chosen"), (b["rejected_index"][i], "rejected")):
            n = len(e[f"{k}_input_ids"])
            assert b["input_ids"][r, :n].tolist() == e[f"{k}_input_ids"] and b["attention_mask"][r].sum() == n
            assert b["labels"][r, :n - 1].tolist() == e[f"{k}_labels"][1:]
            t = b["labels"][r]
            assert tok.decode(t[t != -100].tolist()).endswith(pairs[i][k] + "<|im_end|>")
    with pytest.raises(KeyError, match="rejected_input_ids"): DPOCollator()([{"chosen_input_ids": [1], "chosen_labels": [1]}])


def test_multimodal_expansion(tok):
    VS, VE = tok.token_to_id("<|vision_start|>"), tok.token_to_id("<|vision_end|>")
    D, g = 3 * 2 * 16 * 16, torch.Generator().manual_seed(0)
    def sample(grids, text):
        grid = torch.tensor(grids).view(-1, 3)
        ids = [t for _ in grids for t in (VS, IMAGE_PAD_ID, VE)] + text
        return {"input_ids": ids, "pixel_values": torch.randn(int(grid.prod(-1).sum()), D, generator=g), "image_grid_thw": grid}
    s = [sample([(1, 28, 28)], [11, 12]), sample([(1, 4, 6), (2, 2, 2)], [5, 6, 7]), {"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}]
    mc = MultimodalCollator(merge_size=CFG.vision_merger_spatial_factor, pad_to_multiple_of=8)
    b = mc(s)
    assert (b["input_ids"] == IMAGE_PAD_ID).sum(1).tolist() == [196, 6 + 2, 0]
    assert b["pixel_values"].shape == (784 + 24 + 8, D) and torch.equal(b["pixel_values"][784:808], s[1]["pixel_values"][:24])
    assert b["image_grid_thw"].tolist() == [[1, 28, 28], [1, 4, 6], [2, 2, 2]]
    assert not (b["labels"] == IMAGE_PAD_ID).any() and (b["labels"][b["attention_mask"] == 0] == -100).all()
    assert b["labels"][0][b["labels"][0] != -100].tolist() == [VE, 11, 12]
    assert b["labels"][2, :3].tolist() == [2, 3, -100]             # given labels are kept (and shifted)
    assert b["input_ids"].shape[1] % 8 == 0 and b["attention_mask"].sum(1).tolist() == [200, 4 + 8 + 3, 3]
    assert mc([{"input_ids": [1, 2]}])["pixel_values"] is None
    with pytest.raises(KeyError, match="pixel_values"): mc([{"input_ids": [IMAGE_PAD_ID]}])
    bad = sample([(1, 4, 4)], [1]); bad["pixel_values"] = bad["pixel_values"][:5]
    with pytest.raises(ValueError, match="5 patches"): mc([bad])
    with pytest.raises(ValueError, match="one placeholder per image"): mc([{**sample([(1, 2, 2)], [1]), "image_grid_thw": torch.ones(2, 3, dtype=torch.long)}])
    with pytest.raises(ValueError, match="multiples of merge_size"): mc([sample([(1, 3, 4)], [1])])
    with pytest.raises(ValueError, match="without cutting an image"): MultimodalCollator(max_seq_len=10)([sample([(1, 8, 8)], [1])])
    assert shift_labels(torch.tensor([1, 2, 3])).tolist() == [2, 3, -100]
