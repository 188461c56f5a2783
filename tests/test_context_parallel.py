"""Ring attention (distributed/context_parallel) on 2 and 4 gloo ranks (CPU): equal to full attention forward and backward
(causal, packed documents, GQA) in PyTorch (float64) and with the Triton kernel in its interpreter (float32; conftest
sets TRITON_INTERPRET=1 without a GPU); the debug model under cp=2 gives one process's loss and every gradient, with and
without packed documents; bad sequence lengths and unshardable inputs are refused."""
import copy, os

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from qwen3_scratch.distributed.context_parallel import (RingAttention, apply_cp, cp_comm_bytes, cp_context, cp_shard,
                                                        cp_unshard)
from qwen3_scratch.errors import ConfigError
from qwen3_scratch.kernels.utils import document_ids, triton_importable
from qwen3_scratch.model.attention import attention_ref, build_attention_mask
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model


TOL = dict(atol=1e-5, rtol=1e-5)

from ranks import spawn
# the kernel path over gloo runs in Triton's interpreter (CPU tensors): gloo cannot send CUDA tensors, and one GPU cannot
# host two NCCL ranks; on a GPU, tests/test_parallel_gpu.py runs the kernel path on a one-rank NCCL group instead
KERNEL = triton_importable() and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1"


def _spawn(fn, nprocs, *args): spawn(fn, nprocs, *args, timeout_s=120)


def _reference(q, k, v, dout, mask):
    "float64 full attention on the whole sequence: out, dq, dk, dv."
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = attention_ref(q, k, v, mask=mask)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _check_attention(rank, cp, kernel, causal_only):
    "RingAttention on this rank's shard == the shard of full attention; out, dq, dk, dv; with and without documents."
    B, Hq, Hkv, T, D = 2, 4, 2, 8 * cp, 8                   # GQA, chunks of 4 tokens
    dtype, dev = (torch.float32, "cpu") if kernel else (torch.float64, "cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(B, h, T, D, generator=g, dtype=torch.float64) for h in (Hq, Hkv, Hkv, Hq))
    cu = torch.tensor([0, 3, T - 5, T, 2 * T - 2, 2 * T])     # 3 + (T-8) + 5 tokens in row 0, (T-2) + 2 in row 1
    doc, _ = document_ids(cu, B, T)
    late = document_ids(torch.tensor([0, T - 4, T, 2 * T - 4, 2 * T]), B, T)[0]  # the last chunk is a document: blocks skipped
    attn = RingAttention(dist.group.WORLD, kernels="triton" if kernel else "torch")
    cases = [(True, None), (True, doc), (True, late)] + ([] if causal_only else [(False, None), (False, doc)])
    sh = lambda t: cp_shard(t, rank, cp, dim=2)
    for causal, docs in cases:
        mask = torch.ones(T, T, dtype=torch.bool)
        mask = mask.tril() if causal else mask
        if docs is not None: mask = mask & (docs[:, None, :, None] == docs[:, None, None, :])        # (B, 1, T, T)
        if causal and docs is not None: assert torch.equal(mask, build_attention_mask(T, T, doc_ids=docs)[0])
        ref = _reference(q, k, v, dout, mask)
        local = [sh(t).to(dev, dtype).requires_grad_() for t in (q, k, v)]
        with cp_context(attn, doc_ids=None if docs is None else cp_shard(docs, rank, cp)):
            out = attn(*local, is_causal=causal)
        out.backward(sh(dout).to(dev, dtype))
        what = f"rank {rank} cp={cp} causal={causal} docs={docs is not None} kernel={kernel}"
        torch.testing.assert_close(cp_unshard(out.detach(), cp, dim=2).cpu().double(), ref[0], **TOL, msg=what)
        for name, got, want in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in local)), ref):
            torch.testing.assert_close(got.detach().cpu().double(), sh(want), **TOL, msg=f"{name}: {what}")


def _attention(rank, cp, kernel):
    _check_attention(rank, cp, False, False)
    if kernel: _check_attention(rank, cp, True, True)


def test_ring_attention_cp2():
    _spawn(_attention, 2, KERNEL)


def test_ring_attention_cp4():
    _spawn(_attention, 4, False)  # the kernel path at cp=4 takes ~35 s more in the interpreter on 2 cores


CFG = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           intermediate_size=64, kernels="torch")


def _model(rank, cp):
    "The debug model on each rank's shard: loss (token sum all-reduced / global count) and all-reduced gradients == one process."
    torch.manual_seed(0)
    plain = Qwen3Model(ModelConfig.from_preset("debug").replace(**CFG))
    B, T = 2, 16
    ids = torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, 1); labels[:, -1] = -100
    cu = torch.tensor([0, 5, 16, 23, 32])                     # 5 + 11 tokens in row 0, 7 + 9 in row 1
    doc, pos = document_ids(cu, B, T)
    mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
    sh = lambda t: cp_shard(t, rank, cp)
    n_total, n_local = (labels != -100).sum(), (sh(labels) != -100).sum()
    for packed, give_pos in ((False, False), (True, True), (True, False)):  # in-document positions given, or derived
        ref = copy.deepcopy(plain)
        want = ref(ids, labels=labels, cu_seqlens=cu if packed else None).loss
        want.backward()
        model = apply_cp(copy.deepcopy(plain), mesh)
        ctx = dict(doc_ids=sh(doc), **(dict(position_ids=sh(pos)) if give_pos else {})) if packed else {}
        with cp_context(model, **ctx):
            loss = model(sh(ids), labels=sh(labels)).loss * n_local / n_total   # this rank's share of the global mean
            loss.backward()
        total = loss.detach().clone(); dist.all_reduce(total)
        torch.testing.assert_close(total, want.detach(), **TOL)
        for (name, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
            grad = p.grad.clone(); dist.all_reduce(grad)          # what FSDP / DDP over dp x cp sums
            torch.testing.assert_close(grad, pr.grad, **TOL, msg=f"{name} packed={packed} positions given={give_pos}")
    with cp_context(model):  # explicit global positions give the same loss; local ones (0..T/cp) do not: RoPE needs them
        with torch.no_grad():
            glob = model(sh(ids), position_ids=sh(torch.arange(T).expand(B, T)), labels=sh(labels)).loss
            wrong = model(sh(ids), position_ids=torch.arange(T // cp).expand(B, T // cp), labels=sh(labels)).loss
        with pytest.raises(ConfigError, match="takes no cu_seqlens"): model(sh(ids), cu_seqlens=cu)
    total = (glob * n_local / n_total).clone(); dist.all_reduce(total)
    plain_loss = plain(ids, labels=labels).loss.detach()
    torch.testing.assert_close(total, plain_loss, **TOL)
    if rank == cp - 1: assert not torch.allclose(wrong, glob)  # the last rank holds chunks far from 0..T/cp
    local_cu = torch.tensor([0, 3, T // cp, T * B // cp])
    with pytest.raises(ConfigError, match="takes no dense mask"): model(sh(ids), cu_seqlens=local_cu)  # the torch path's mask
    attn = model.layers[0].self_attn.inner_attention
    x = torch.randn(B, 4, T // cp, 8)
    with pytest.raises(ConfigError, match="describe the unsharded sequence"): attn(x, x, x, cu_seqlens=cu)
    with pytest.raises(ConfigError, match="KV cache"): attn(x, x[:, :, :2], x[:, :, :2])


def test_model_cp2():
    _spawn(_model, 2)


def test_bad_seq_len():
    with pytest.raises(ConfigError, match="multiple of 8"): cp_shard(torch.zeros(1, 12), 0, 4)
    with pytest.raises(ConfigError, match="divisible by 2 x cp_size = 4"): cp_comm_bytes(ModelConfig(), 1, 10, 2)


def test_comm_bytes():
    cfg = ModelConfig.from_preset("small")                   # 28 layers, 8 KV heads of 128
    b = cp_comm_bytes(cfg, 2, 4096, 4, dtype_bytes=2)
    block = 2 * 2 * 1024 * 8 * 128 * 2                        # K and V of 1024 local tokens, bf16
    assert b["kv_block"] == block and b["forward"] == 28 * 3 * block
    assert b["backward"] == 28 * (3 * block + 4 * 2 * block) and b["total"] == b["forward"] + b["backward"]
    assert cp_comm_bytes(cfg, 2, 4096, 1)["total"] == 0
