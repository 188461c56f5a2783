"""FlashAttention-2 kernel against the float64 reference: out, lse, dq, dk, dv; causal, GQA, documents, odd lengths.

Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1) on tiny shapes; with one it adds bf16
at training sizes."""
import pytest
import torch

triton = pytest.importorskip("triton")
from qwen3_scratch.kernels.flash_attn import flash_attention  # noqa: E402
from qwen3_scratch.kernels.utils import REL_TOL, assert_close, poison_outputs, test_device  # noqa: E402
from qwen3_scratch.model.attention import attention_ref, build_attention_mask, document_ids, repeat_kv  # noqa: E402

DEV = test_device()
GPU = torch.cuda.is_available()


def tol(dtype, grad=False):
    "fp32: TF32 dots on a GPU (~1e-3); fp16/bf16: P and dS are rounded to 16 bits before the gradient dots."
    if dtype == torch.float32: return 5e-3 if GPU else 2e-5
    return REL_TOL[dtype] * (2 if grad else 1)


def reference(q, k, v, causal, scale, cu):
    "float64 out (with autograd) and lse of the masked attention."
    B, Hq, S, D = q.shape
    mask = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()[None, None] if causal else None
    if cu is not None:
        doc, _ = document_ids(cu, B, S)
        same = doc[:, None, :, None] == doc[:, None, None, :]
        mask = same & mask if causal else same
        if causal: assert torch.equal(mask, build_attention_mask(S, S, doc_ids=doc, device=doc.device)[0])
    out = attention_ref(q, k, v, mask=mask, scale=scale)
    s = q @ repeat_kv(k, Hq // k.shape[1]).transpose(-2, -1) * (scale or D ** -0.5)
    if mask is not None: s = s.masked_fill(~mask, float("-inf"))
    return out, torch.logsumexp(s.detach(), -1)


def run_check(B, Hq, Hkv, S, D, dtype, causal=True, cu=None, bshd=False, scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    def make(H):
        x = torch.randn(B, S, H, D, generator=g).transpose(1, 2) if bshd else torch.randn(B, H, S, D, generator=g)
        return x.to(DEV, dtype).requires_grad_()
    q, k, v = make(Hq), make(Hkv), make(Hkv)
    dout = torch.randn(B, Hq, S, D, generator=g).to(DEV, dtype)
    cu = cu.to(DEV) if cu is not None else None
    with poison_outputs():
        out, lse = flash_attention(q, k, v, causal=causal, softmax_scale=scale, cu_seqlens=cu)
        out.backward(dout)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, ref_lse = reference(q64, k64, v64, causal, scale, cu)
    ref.backward(dout.double())
    assert out.dtype == dtype and out.shape == q.shape and lse.dtype == torch.float32 and lse.shape == (B, Hq, S)
    assert_close(out, ref, tol=tol(dtype), name="out")
    assert_close(lse, ref_lse, tol=tol(torch.float32), name="lse")
    for name, a, r in [("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)]:
        assert a.dtype == dtype
        assert_close(a, r, tol=tol(dtype, grad=True), name=name)


CU = torch.tensor([0, 5, 40, 67, 70, 100, 134])  # uneven documents across 2 rows of 67: 5+35+27 and 3+30+34

CPU_CASES = [  # (B, Hq, Hkv, S, D, causal, docs, bshd)
    (1, 2, 2, 6, 16, True, False, False),
    (2, 4, 2, 42, 32, True, False, True),
    (1, 4, 1, 67, 64, False, False, False),
    (2, 2, 1, 67, 24, True, False, False),
    (2, 4, 2, 67, 32, True, True, True),
    (2, 4, 4, 67, 16, False, True, False),
    (2, 4, 1, 67, 64, True, True, False),
]


@pytest.mark.parametrize("case", CPU_CASES, ids=str)
def test_fp32(case):
    B, Hq, Hkv, S, D, causal, docs, bshd = case
    run_check(B, Hq, Hkv, S, D, torch.float32, causal, CU if docs else None, bshd, seed=S + D)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("docs", [False, True])
def test_half_dtypes(dtype, docs):
    run_check(2, 4, 2, 67, 32, dtype, cu=CU if docs else None, seed=7)


def test_scale_and_gqa4():
    run_check(1, 8, 2, 42, 16, torch.float32, scale=0.3, seed=11)


def test_documents_are_independent():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 67, 16, generator=g).to(DEV) for h in (4, 2, 2))
    cu = torch.tensor([0, 20, 51, 67], device=DEV)
    packed, packed_lse = flash_attention(q, k, v, cu_seqlens=cu)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone, alone_lse = flash_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
        assert_close(packed[:, :, a:b], alone, tol=tol(torch.float32))
        assert_close(packed_lse[:, :, a:b], alone_lse, tol=tol(torch.float32))


def test_expanded_grad():
    "out.sum() hands the backward a stride-0 dout; the kernels need the head dim at stride 1."
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, h, 42, 16, generator=g).to(DEV).requires_grad_() for h in (2, 1, 1))
    flash_attention(q, k, v)[0].sum().backward()
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    reference(q64, k64, v64, True, None, None)[0].sum().backward()
    for a, r in [(q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)]: assert_close(a, r, tol=tol(torch.float32, True))


def test_errors():
    x = torch.randn(1, 4, 8, 16, device=DEV)
    with pytest.raises(ValueError, match="not a multiple of 3 KV heads"): flash_attention(x, x[:, :3], x[:, :3])
    with pytest.raises(ValueError, match=r"head_dim of q \(16\) != head_dim of k/v \(8\)"):
        flash_attention(x, x[..., :8], x[..., :8])
    with pytest.raises(ValueError, match="one batch and length"): flash_attention(x, x[:, :, :5], x[:, :, :5])
    with pytest.raises(ValueError, match="must be 4-D"): flash_attention(x[0], x[0], x[0])
    with pytest.raises(ValueError, match="same shape"): flash_attention(x, x, x[:, :2])
    with pytest.raises(ValueError, match="head_dim 512 > 256"):
        y = torch.randn(1, 1, 4, 512, device=DEV); flash_attention(y, y, y)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"): flash_attention(x.double(), x.double(), x.double())
    with pytest.raises(TypeError, match="share one dtype"): flash_attention(x, x.half(), x.half())
    with pytest.raises(TypeError, match="int32 or int64"): flash_attention(x, x, x, cu_seqlens=torch.tensor([0, 3, 8.0], device=DEV))
    with pytest.raises(ValueError, match="rise from 0"): flash_attention(x, x, x, cu_seqlens=torch.tensor([0, 3, 9], device=DEV))
    with pytest.raises(ValueError, match="rise from 0"): flash_attention(x, x, x, cu_seqlens=torch.tensor([0, 5, 3, 8], device=DEV))
    x2 = torch.randn(2, 4, 8, 16, device=DEV)
    with pytest.raises(ValueError, match="cross a row"): flash_attention(x2, x2, x2, cu_seqlens=torch.tensor([0, 10, 16], device=DEV))
    if GPU:
        with pytest.raises(ValueError, match="move it to q's device"):
            flash_attention(x, x, x, cu_seqlens=torch.tensor([0, 8]))


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
@pytest.mark.parametrize("case", [(2, 16, 16, 1024, 128, None), (2, 16, 4, 1000, 128, None), (2, 8, 8, 1024, 64, None),
                                  (1, 4, 2, 777, 96, None), (1, 2, 2, 555, 256, None),
                                  (2, 16, 4, 1024, 128, torch.tensor([0, 100, 900, 1024, 1500, 2048]))], ids=str)
def test_bf16_gpu_sizes(case):
    B, Hq, Hkv, S, D, cu = case
    run_check(B, Hq, Hkv, S, D, torch.bfloat16, cu=cu, bshd=True, seed=S)


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU")
def test_gpu_noncausal_fp16_fp32():
    run_check(2, 8, 2, 1000, 128, torch.float16, causal=False, seed=1)
    run_check(1, 4, 2, 300, 64, torch.float32, cu=torch.tensor([0, 100, 250, 300]), seed=2)
