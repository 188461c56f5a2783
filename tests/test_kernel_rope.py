"""Fused RoPE kernel against the PyTorch reference: q, k and both gradients, in place and not, poisoned outputs.

Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one it adds bf16 at Qwen3-8B's
shapes."""
import pytest
import torch

triton = pytest.importorskip("triton")
from qwen3_scratch.kernels.rope import apply_rope, apply_rope_  # noqa: E402
from qwen3_scratch.kernels.utils import assert_close, poison_outputs, test_device  # noqa: E402
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.rope import RotaryEmbedding, apply_rotary_pos_emb  # noqa: E402

DEV = test_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
# (B, Hq, Hkv, T, D, table, layout): GQA, odd T and D, YaRN and arbitrary tables, the model's views and contiguous
CPU_CASES = [(2, 4, 2, 42, 64, "rope", "bthd"), (1, 3, 1, 123, 42, "yarn", "bthd"),
             (1, 2, 2, 6, 42, "random", "bhtd"), (2, 1, 1, 6, 64, "random", "bthd")]
GPU_CASES = [(1, 32, 8, 4096, 128, "yarn", "bthd"), (4, 32, 8, 4096, 128, "rope", "bthd"),
             (2, 40, 8, 1000, 128, "random", "bthd"), (3, 16, 4, 777, 64, "random", "bhtd")]


def inputs(B, Hq, Hkv, T, D, dtype, table, layout, g):
    if layout == "bthd":  # (B, H, T, D) views of (B, T, H, D) projections, as the model passes them
        q, k = torch.randn(B, T, Hq, D, generator=g).transpose(1, 2), torch.randn(B, T, Hkv, D, generator=g).transpose(1, 2)
    else: q, k = torch.randn(B, Hq, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    if table == "random": cos, sin = torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g)
    else:
        cfg = ModelConfig(head_dim=D, num_attention_heads=Hq, num_key_value_heads=Hkv,
                          rope_scaling=YARN if table == "yarn" else None)
        cos, sin = RotaryEmbedding(cfg)(torch.randint(0, 5000, (B, T), generator=g))
    return [t.to(DEV, dtype) for t in (q, k, cos, sin)]


def run(case, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, cos, sin = inputs(*case[:5], dtype, *case[5:], g)
    gq, gk = torch.randn(q.shape, generator=g).to(q), torch.randn(k.shape, generator=g).to(k)
    q64, k64 = q.double().requires_grad_(), k.double().requires_grad_()
    rq, rk = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
    torch.autograd.backward((rq, rk), (gq.double(), gk.double()))
    qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
    with poison_outputs():
        qo, ko = apply_rope(qa, ka, cos, sin)
        torch.autograd.backward((qo, ko), (gq, gk))
    ours, ref = (qo, ko, qa.grad, ka.grad), (rq, rk, q64.grad, k64.grad)
    for name, out, r in zip(("q", "k", "dq", "dk"), ours, ref):
        assert_close(out, r, dtype=dtype, name=name)
        assert out.dtype == dtype
    assert [s for s, n in zip(qo.stride(), q.shape) if n > 1] == [s for s, n in zip(q.stride(), q.shape) if n > 1]
    assert not qo._is_view() and not ko._is_view()  # so that in-place ops on them work later
    # in place on non-leaf tensors: same values and gradients
    qb, kb = q.clone().requires_grad_(), k.clone().requires_grad_()
    with poison_outputs():
        qi, ki = apply_rope_(qb * 1, kb * 1, cos, sin)
        torch.autograd.backward((qi, ki), (gq, gk))
    assert torch.equal(qi, qo) and torch.equal(ki, ko)
    assert torch.equal(qb.grad, qa.grad) and torch.equal(kb.grad, ka.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_matches_reference(case, dtype):
    run(case, dtype, seed=hash((case, str(dtype))) % 1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_bf16_gpu_sizes(case):
    run(case, torch.bfloat16, seed=1)


def test_inplace_on_views_and_broadcast_table():
    g = torch.Generator().manual_seed(2)
    xq = torch.randn(2, 6, 4, 64, generator=g).to(DEV).requires_grad_()  # (B, T, H, D) leaves
    xk = torch.randn(2, 6, 2, 64, generator=g).to(DEV).requires_grad_()
    cos, sin = inputs(2, 4, 2, 6, 64, torch.float32, "yarn", "bthd", g)[2:]
    qv, kv = (xq * 2).transpose(1, 2), (xk * 2).transpose(1, 2)  # non-leaf views, as in the model
    qi, ki = apply_rope_(qv, kv, cos, sin)
    assert qi is qv and ki is kv
    (qi.square().sum() + ki.sum()).backward()
    gq, gk = xq.grad.clone(), xk.grad.clone()
    xq.grad = xk.grad = None
    qr, kr = apply_rotary_pos_emb((xq * 2).transpose(1, 2), (xk * 2).transpose(1, 2), cos, sin)
    (qr.square().sum() + kr.sum()).backward()
    assert_close(gq, xq.grad); assert_close(gk, xk.grad)
    assert_close(qi.detach(), qr.detach()); assert_close(ki.detach(), kr.detach())
    # a (1, T, D) table broadcasts over the batch, in place without autograd too
    q, k = qr.detach().clone(), kr.detach().clone()
    ref = apply_rotary_pos_emb(q.double(), k.double(), cos[:1].double(), sin[:1].double())
    with torch.no_grad(): apply_rope_(q, k, cos[:1], sin[:1])
    assert_close(q, ref[0]); assert_close(k, ref[1])


def test_strided_last_dim_and_mismatched_tables():
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 3, 42, 6, generator=g).to(DEV).mT  # (B, H, T, D) with a strided last dim: copied
    k = torch.randn(2, 1, 42, 6, generator=g).to(DEV).mT
    cos, sin = torch.randn(2, 6, 42, generator=g).to(DEV), torch.randn(2, 42, 6, generator=g).to(DEV).mT
    rq, rk = apply_rotary_pos_emb(q.double(), k.double(), cos.double(), sin.double())
    with poison_outputs(): qo, ko = apply_rope(q, k, cos, sin)
    assert_close(qo, rq); assert_close(ko, rk)
    apply_rope_(q, k, cos, sin)  # in place through a contiguous copy, written back
    assert_close(q, rq); assert_close(k, rk)


def test_gradient_layout_follows_q():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 6, 4, 64, generator=g).to(DEV).transpose(1, 2).requires_grad_()  # the model's layout
    k = torch.randn(2, 6, 2, 64, generator=g).to(DEV).transpose(1, 2).requires_grad_()
    cos, sin = torch.randn(2, 6, 64, generator=g).to(DEV), torch.randn(2, 6, 64, generator=g).to(DEV)
    qo, ko = apply_rope(q, k, cos, sin)
    gq, gk = torch.randn(2, 4, 6, 64, generator=g).to(DEV), torch.randn(2, 2, 6, 64, generator=g).to(DEV)  # contiguous
    dq, dk = torch.autograd.grad((qo, ko), (q, k), (gq, gk))
    assert dq.stride() == q.stride() and dk.stride() == k.stride()  # no relayout copy downstream
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    rq, rk = apply_rotary_pos_emb(q64, k64, cos.double(), sin.double())
    rdq, rdk = torch.autograd.grad((rq, rk), (q64, k64), (gq.double(), gk.double()))
    assert_close(dq, rdq); assert_close(dk, rdk)


def test_inplace_autograd_rules():
    cos, sin = torch.randn(1, 6, 64, device=DEV), torch.randn(1, 6, 64, device=DEV)
    leaf = torch.randn(1, 2, 6, 64, device=DEV, requires_grad=True)
    before = leaf.detach().clone()
    with pytest.raises(RuntimeError, match="leaf tensor that requires grad"):
        apply_rope_(leaf, torch.randn(1, 1, 6, 64, device=DEV), cos, sin)
    assert torch.equal(leaf.detach(), before)  # refused before the kernel wrote
    x = torch.randn(1, 6, 2, 64, device=DEV, requires_grad=True)
    y = x * 1
    z = y.square()  # saves y for its backward
    apply_rope_(y.transpose(1, 2), torch.randn(1, 1, 6, 64, device=DEV), cos, sin)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"): z.sum().backward()


def test_errors():
    q, k, c = torch.randn(1, 2, 5, 8, device=DEV), torch.randn(1, 1, 5, 8, device=DEV), torch.randn(1, 5, 8, device=DEV)
    with pytest.raises(ValueError, match="head_dim 7 is odd"): apply_rope(q[..., :7], k[..., :7], c[..., :7], c[..., :7])
    with pytest.raises(ValueError, match=r"cos has shape \(1, 4, 8\), expected \(B, T, D\) = \(1, 5, 8\)"):
        apply_rope(q, k, c[:, :4], c[:, :4])
    with pytest.raises(ValueError, match=r"sin has shape \(2, 5, 8\)"): apply_rope(q, k, c, c.expand(2, 5, 8))
    with pytest.raises(ValueError, match="does not match q"): apply_rope(q, k[:, :, :3], c, c)
    with pytest.raises(ValueError, match="must be 4-D"): apply_rope(q[0], k[0], c, c)
    with pytest.raises(TypeError, match="cast them to one dtype"): apply_rope(q, k.half(), c, c)
    with pytest.raises(TypeError, match="floating point"): apply_rope(q, k, c.long(), c.long())
    with pytest.raises(ValueError, match="one device"): apply_rope(q, k, c.to("meta"), c)
