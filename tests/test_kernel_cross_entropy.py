"""Cross-entropy kernels against PyTorch on float64 copies: loss and every gradient, odd shapes, ignored rows, chunks.

Without a GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one they add Qwen3's head
(8192 tokens, d=2048, V=151,936) in bf16 against eager PyTorch."""
import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")
from qwen3_scratch.kernels.cross_entropy import (  # noqa: E402
    cross_entropy, cross_entropy_fwd, cross_entropy_ref, default_chunk_size, fused_linear_cross_entropy,
    linear_cross_entropy_ref)
from qwen3_scratch.kernels.utils import assert_close, poison_outputs, test_device  # noqa: E402

DEV = test_device()
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def targets(g, N, V, n_ignored=0, ignore_index=-100):
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.randperm(N, generator=g)[:n_ignored]] = ignore_index
    return t.to(DEV)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("N,V,n_ignored", [(6, 431, 0), (42, 1000, 7), (123, 5003, 0), (431, 123, 430)], ids=str)
def test_cross_entropy(N, V, n_ignored, dtype):
    g = torch.Generator().manual_seed(N * V)
    x = (torch.randn(N, V, generator=g) * 3 + 1).to(DEV, dtype).requires_grad_()
    t = targets(g, N, V, n_ignored)
    with poison_outputs():
        loss = cross_entropy(x, t)
        (loss * 3.7).backward()
    x64 = x.detach().double().requires_grad_()
    loss64 = F.cross_entropy(x64, t)
    (loss64 * 3.7).backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == dtype
    assert_close(loss, loss64, tol=1e-5, name="loss")
    assert_close(x.grad, x64.grad, tol=TOL[dtype], name="dlogits")
    assert (x.grad[t == -100] == 0).all()


@pytest.mark.parametrize("block_v", [32, 128, 1024])
def test_blocks_and_tails(block_v):
    g = torch.Generator().manual_seed(block_v)
    x = (torch.randn(42, 431, generator=g) * 5).to(DEV)
    t = targets(g, 42, 431, 3, ignore_index=7)
    with poison_outputs(): loss, lse = cross_entropy_fwd(x, t, ignore_index=7, block_v=block_v)
    keep = t != 7
    assert_close(lse[keep], torch.logsumexp(x[keep].double(), -1), tol=1e-6, name="lse")
    assert_close(loss, F.cross_entropy(x.double(), t, ignore_index=7, reduction="none"), tol=1e-6, name="loss rows")


def test_all_ignored_strided_int32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 431, generator=g).to(DEV).requires_grad_()
    loss = cross_entropy(x, torch.full((6,), -100, device=DEV))
    loss.backward()
    assert loss.isnan() and (x.grad == 0).all()  # as F.cross_entropy
    xb = torch.randn(12, 600, generator=g).to(DEV)
    t = targets(g, 6, 431)
    for view in (xb[::2, :431], xb[:6, 7:438]):
        assert_close(cross_entropy(view, t), cross_entropy_ref(view.double(), t), tol=1e-6)
        assert_close(cross_entropy(view, t.int()), cross_entropy_ref(view.double(), t), tol=1e-6)


def run_fused(g, N, d, V, dtype, chunk_size=None, n_ignored=0, scale=1.0, need=(True, True), fp32_acc=False):
    h = (torch.randn(N, d, generator=g) * 0.5).to(DEV, dtype).requires_grad_(need[0])
    w = (torch.randn(V, d, generator=g) * 0.3).to(DEV, dtype).requires_grad_(need[1])
    t = targets(g, N, V, n_ignored)
    with poison_outputs():
        loss = fused_linear_cross_entropy(h, w, t, chunk_size=chunk_size, grad_weight_fp32=fp32_acc)
        (loss * scale).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss64 = linear_cross_entropy_ref(h64, w64, t)
    (loss64 * scale).backward()
    return (loss, h.grad, w.grad), (loss64, h64.grad, w64.grad)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("N,d,V,chunk,n_ignored", [(6, 16, 5003, 1, 0), (42, 32, 1000, None, 5),
                                                   (123, 48, 431, 50, 0), (431, 24, 123, 64, 430)], ids=str)
def test_fused_linear(N, d, V, chunk, n_ignored, dtype):
    g = torch.Generator().manual_seed(N + d + V)
    (loss, gh, gw), (loss64, gh64, gw64) = run_fused(g, N, d, V, dtype, chunk, n_ignored, scale=3.7)
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and gh.dtype == gw.dtype == dtype
    assert_close(loss, loss64, tol=tol, name="loss")
    assert_close(gh, gh64, tol=tol, name="grad_hidden")
    assert_close(gw, gw64, tol=tol, name="grad_weight")


@pytest.mark.parametrize("need", [(True, False), (False, True)], ids=["frozen_head", "frozen_hidden"])
def test_fused_partial_grads_and_fp32_acc(need):
    g = torch.Generator().manual_seed(1)
    (loss, gh, gw), (loss64, gh64, gw64) = run_fused(g, 42, 32, 431, torch.bfloat16, 16, 3, need=need, fp32_acc=True)
    assert_close(loss, loss64, tol=1.6e-2)
    assert (gh is None) != need[0] and (gw is None) != need[1]
    if need[0]: assert_close(gh, gh64, tol=1.6e-2)
    if need[1]: assert_close(gw, gw64, tol=1.6e-2)


def test_fused_tied_and_no_grad():
    g = torch.Generator().manual_seed(2)
    V, d, N = 431, 32, 42
    w = (torch.randn(V, d, generator=g) * 0.3).to(DEV).requires_grad_()
    ids, t, gain = targets(g, N, V), targets(g, N, V, 5), torch.randn(d, generator=g).to(DEV)
    fused_linear_cross_entropy(torch.tanh(F.embedding(ids, w) * gain), w, t, chunk_size=10).backward()
    w64 = w.detach().double().requires_grad_()
    linear_cross_entropy_ref(torch.tanh(F.embedding(ids, w64) * gain.double()), w64, t).backward()
    assert_close(w.grad, w64.grad, tol=1e-5, name="tied weight grad")  # embedding + head gradients summed
    with torch.no_grad():
        assert_close(fused_linear_cross_entropy(F.embedding(ids, w), w, t),
                     linear_cross_entropy_ref(F.embedding(ids, w).double(), w.double(), t), tol=1e-5)


def test_chunk_size():
    assert default_chunk_size(8192, 151_936, 2) == 1024 and default_chunk_size(100, 151_936, 2) == 100
    assert default_chunk_size(1, 151_936, 4) == 1


def test_errors():
    x, w = torch.randn(6, 431, device=DEV), torch.randn(431, 8, device=DEV)
    h, t = torch.randn(6, 8, device=DEV), torch.arange(6, device=DEV)
    with pytest.raises(ValueError, match=r"target 431 at row 3 is outside \[0, 431\)"):
        cross_entropy(x, torch.tensor([0, 1, 2, 431, 4, 5], device=DEV))
    with pytest.raises(ValueError, match="not ignore_index=-100"): cross_entropy(x, t - 1)
    with pytest.raises(ValueError, match="do not match 6 rows"): cross_entropy(x, t[:5])
    with pytest.raises(TypeError, match=r"targets.long\(\)"): cross_entropy(x, t.float())
    with pytest.raises(ValueError, match="flatten the leading"): cross_entropy(x[None], t)
    with pytest.raises(TypeError, match="floating point"): cross_entropy(x.long(), t)
    with pytest.raises(ValueError, match="same d"): fused_linear_cross_entropy(h, w.T, t)
    with pytest.raises(TypeError, match="one floating-point dtype"): fused_linear_cross_entropy(h, w.half(), t)
    with pytest.raises(ValueError, match="do not match 6 rows"): fused_linear_cross_entropy(h, w, t[None])
    with pytest.raises(ValueError, match=r"outside \[0, 431\)"): fused_linear_cross_entropy(h, w, t + 430)
    with pytest.raises(ValueError, match="positive int"): fused_linear_cross_entropy(h, w, t, chunk_size=0)
    if DEV == "cuda":
        with pytest.raises(ValueError, match="different devices"): cross_entropy(x, t.cpu())


@CUDA
@pytest.mark.parametrize("fp32_acc", [False, True])
def test_fused_qwen3_head_bf16(fp32_acc):
    N, d, V = 8192, 2048, 151_936
    gen = torch.Generator(device="cuda").manual_seed(0)
    h = (torch.randn(N, d, device="cuda", generator=gen) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(V, d, device="cuda", generator=gen) * 0.02).bfloat16().requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda", generator=gen)
    t[torch.randperm(N, device="cuda", generator=gen)[:N // 10]] = -100
    with poison_outputs():
        loss = fused_linear_cross_entropy(h, w, t, grad_weight_fp32=fp32_acc)
        (loss * 3.7).backward()
    gh, gw = h.grad, w.grad
    h.grad = w.grad = None
    loss_e = linear_cross_entropy_ref(h, w, t)  # eager: bf16 logits, float32 cross-entropy
    (loss_e * 3.7).backward()
    assert_close(loss, loss_e, tol=1e-3, name="loss")
    assert_close(gh, h.grad, tol=1.6e-2, name="grad_hidden")
    assert_close(gw, w.grad, tol=1.6e-2, name="grad_weight")


@CUDA
def test_cross_entropy_qwen3_vocab_bf16():
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(4099, 151_936, device="cuda", generator=gen) * 2).bfloat16().requires_grad_()
    t = torch.randint(0, 151_936, (4099,), device="cuda", generator=gen)
    t[::7] = -100
    with poison_outputs():
        loss = cross_entropy(x, t)
        loss.backward()
    gx, x.grad = x.grad, None
    loss_e = cross_entropy_ref(x, t)
    loss_e.backward()
    assert_close(loss, loss_e, tol=1e-5, name="loss")
    assert_close(gx, x.grad, tol=1.6e-2, name="dlogits")
