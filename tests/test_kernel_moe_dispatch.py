"""Triton MoE dispatch/combine against the PyTorch references: the expert order (stable, counts, offsets), the outputs
and every gradient (x, y_sorted, routing weights) vs float64, poisoned outputs, odd shapes, empty experts, views, errors.

Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one it adds bf16 at real sizes."""
import pytest
import torch

triton = pytest.importorskip("triton")
from qwen3_scratch.kernels.moe_dispatch import moe_combine, moe_combine_backward, moe_dispatch, moe_invert  # noqa: E402
from qwen3_scratch.kernels.utils import (assert_close, expert_order, inverse_permutation, poison_outputs,  # noqa: E402
                                         test_device)
from qwen3_scratch.model.moe import moe_combine_ref, moe_dispatch_ref  # noqa: E402  (the references live in the model)

DEV = test_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (T, k, E, H): odd T and H; E = 1 with k > E (repeated ids), E = 3 and 8 with an empty expert whenever k < E
CPU_CASES = [(6, 2, 3, 42), (42, 4, 8, 131), (123, 1, 1, 64), (42, 4, 1, 42), (6, 1, 8, 131), (123, 2, 3, 131)]
GPU_CASES = [(8192, 8, 64, 1024), (2047, 8, 128, 4096), (4099, 2, 8, 2880), (431, 4, 3, 6)]


def routing(T, k, E, g, device=DEV):
    "Random (topk_idx (T, k), topk_weights (T, k) float32) as a router gives; expert E // 2 empty when k < E."
    if k > E: idx = torch.randint(0, E, (T, k), generator=g)
    else:
        scores = torch.rand(T, E, generator=g)
        if k < E: scores[:, E // 2] = -1.0
        idx = scores.topk(k, dim=-1).indices
    return idx.to(device), (torch.rand(T, k, generator=g) + 0.1).to(device)


def round_trip(dispatch, combine, x, idx, w, s, E):
    "dispatch -> expert e scales its rows by s[e] -> combine; returns (out, (sorted_pos, counts, offsets), x_sorted)."
    x_sorted, sorted_pos, counts, offsets = dispatch(x, idx, E)
    e_sorted = torch.repeat_interleave(torch.arange(E, device=x.device), counts)  # (T*k,) expert of each sorted row
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32 product (torch's bf16 grad of s is coarse); fp64 stays
    y_sorted = (x_sorted.to(acc) * s[e_sorted][:, None].to(acc)).to(x.dtype)
    return combine(y_sorted, sorted_pos, w), (sorted_pos, counts, offsets), x_sorted


def check_order(idx, E, sorted_pos, counts, offsets):
    "sorted_pos is the stable sort by expert; counts and offsets are exact."
    flat = idx.reshape(-1).long().cpu()
    sorted_pos, counts, offsets = sorted_pos.cpu(), counts.cpu(), offsets.cpu()
    assert sorted_pos.dtype == counts.dtype == offsets.dtype == torch.int64
    assert torch.equal(counts, torch.bincount(flat, minlength=E))
    assert torch.equal(offsets, torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    assert torch.equal(sorted_pos.sort().values, torch.arange(flat.numel()))  # a permutation
    for e in range(E):  # block e holds exactly expert e's copies, in increasing flat index (stable)
        assert torch.equal(sorted_pos[offsets[e]:offsets[e + 1]], (flat == e).nonzero().flatten())


def run(T, k, E, H, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    idx, w = routing(T, k, E, g)
    x = torch.randn(T, H, generator=g).to(DEV, dtype).requires_grad_()
    wd = w.to(torch.float32 if dtype == torch.float16 else dtype).clone().requires_grad_()  # fp32 weights for fp16
    s = (torch.rand(E, generator=g) + 0.5).to(DEV).requires_grad_()
    go = torch.randn(T, H, generator=g).to(DEV, dtype)
    with poison_outputs():
        out, order, x_sorted = round_trip(moe_dispatch, moe_combine, x, idx, wd, s, E)
        out.backward(go)
    check_order(idx, E, *order)
    assert torch.equal(x_sorted, x.detach()[order[0] // k])  # a copy: exact
    ins64 = [t.detach().double().requires_grad_() for t in (x, wd, s)]
    out64, order64, _ = round_trip(moe_dispatch_ref, moe_combine_ref, ins64[0], idx, ins64[1], ins64[2], E)
    out64.backward(go.double())
    for a, b in zip(order, order64): assert torch.equal(a, b)
    assert out.dtype == dtype and out.shape == (T, H)
    assert_close(out, out64, name="out")
    for name, t, t64 in zip(("x", "weights", "s"), (x, wd, s), ins64):
        assert t.grad.dtype == t.dtype
        assert_close(t.grad, t64.grad, dtype=dtype, name=f"grad {name}")
    return out, x.grad, wd.grad


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T,k,E,H", CPU_CASES)
def test_matches_reference(T, k, E, H, dtype):
    run(T, k, E, H, dtype, seed=T * 1000 + k * 100 + E * 10 + DTYPES.index(dtype))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("T,k,E,H", GPU_CASES)
def test_bf16_gpu_sizes(T, k, E, H):
    first = run(T, k, E, H, torch.bfloat16, seed=1)
    again = run(T, k, E, H, torch.bfloat16, seed=1)
    for a, b in zip(first, again): assert torch.equal(a, b)  # deterministic: no atomics


@pytest.mark.parametrize("int_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8], ids=str)
def test_order_any_int_dtype(int_dtype):
    g = torch.Generator().manual_seed(7)
    idx, _ = routing(123, 4, 8, g)
    ref = expert_order(idx, 8)
    check_order(idx, 8, *ref)
    assert ref[1][8 // 2] == 0  # the empty expert
    x = torch.randn(123, 42, generator=g).to(DEV)
    with poison_outputs(): got = moe_dispatch(x, idx.to(int_dtype), 8)
    for a, b in zip(got[1:], ref): assert torch.equal(a, b)
    assert torch.equal(got[0], x[ref[0] // 4])
    got_unchecked = moe_dispatch(x, idx.to(int_dtype), 8, check=False)
    for a, b in zip(got_unchecked, got): assert torch.equal(a, b)


@pytest.mark.parametrize("n", [1, 42, 1024, 3001])
def test_invert(n):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n)).to(DEV)
    with poison_outputs(): inv = moe_invert(perm)
    assert torch.equal(inv, inverse_permutation(perm))
    assert torch.equal(perm[inv], torch.arange(n, device=DEV))


def test_views_and_stride0_grad():
    "A column slice of a wider x, transposed weights, and the stride-0 grad_out of out.sum().backward()."
    g = torch.Generator().manual_seed(8)
    T, k, E, H = 42, 4, 8, 131
    idx, w = routing(T, k, E, g)
    big = torch.randn(T, H + 5, generator=g).to(DEV).requires_grad_()
    xv = big[:, 3:3 + H]
    wt = w.t().contiguous().t().requires_grad_()  # strides (1, T)
    y = torch.randn(T * k, H, generator=g).to(DEV).requires_grad_()
    with poison_outputs():
        x_sorted, sorted_pos, _, _ = moe_dispatch(xv, idx, E)
        (x_sorted.sum() + moe_combine(y, sorted_pos, wt).sum()).backward()
    assert torch.equal(x_sorted, xv.detach()[sorted_pos // k])
    assert big.grad[:, :3].abs().sum() == 0 and big.grad[:, 3 + H:].abs().sum() == 0
    assert_close(big.grad[:, 3:3 + H], torch.full((T, H), float(k), dtype=torch.float64, device=DEV), name="grad x")
    y64, w64 = y.detach().double().requires_grad_(), w.double().requires_grad_()
    moe_combine_ref(y64, sorted_pos, w64).sum().backward()
    assert_close(y.grad, y64.grad, name="grad y"); assert_close(wt.grad, w64.grad, name="grad w")


def test_stale_inverse_not_used():
    "moe_combine reuses the inv attached by moe_dispatch only while sorted_pos is unmodified."
    g = torch.Generator().manual_seed(10)
    T, k, E, H = 42, 4, 8, 131
    idx, w = routing(T, k, E, g)
    x, y = torch.randn(T, H, generator=g).to(DEV), torch.randn(T * k, H, generator=g).to(DEV)
    _, sorted_pos, _, _ = moe_dispatch(x, idx, E)
    assert sorted_pos._moe_inv[0] == sorted_pos._version
    assert_close(moe_combine(y, sorted_pos, w), moe_combine_ref(y.double(), sorted_pos, w.double()), name="cached")
    sorted_pos.copy_(torch.randperm(T * k, generator=g).to(DEV))
    assert_close(moe_combine(y, sorted_pos, w), moe_combine_ref(y.double(), sorted_pos, w.double()), name="stale")


def test_frozen_inputs():
    "Weights without grad: y_sorted is not saved and only grad_y is computed; and the other way round."
    g = torch.Generator().manual_seed(9)
    T, k, E, H = 6, 2, 3, 42
    idx, w = routing(T, k, E, g)
    _, sorted_pos, _, _ = moe_dispatch_ref(torch.empty(T, 1, device=DEV), idx, E)
    y, go = torch.randn(T * k, H, generator=g).to(DEV), torch.randn(T, H, generator=g).to(DEV)
    yg = y.clone().requires_grad_()
    with poison_outputs():
        out = moe_combine(yg, sorted_pos, w)
        assert out.grad_fn.saved_tensors[0] is None  # y_sorted not kept when the weights need no gradient
        out.backward(go)
        wg = w.clone().requires_grad_()
        moe_combine(y, sorted_pos, wg).backward(go)
    y64, w64 = y.double().requires_grad_(), w.double().requires_grad_()
    moe_combine_ref(y64, sorted_pos, w64).backward(go.double())
    assert_close(yg.grad, y64.grad, name="grad y"); assert_close(wg.grad, w64.grad, name="grad w")
    inv = inverse_permutation(sorted_pos)
    assert moe_combine_backward(go, None, w, inv, need_gy=True, need_gw=False)[1] is None
    assert moe_combine_backward(go, y, w, inv, need_gy=False, need_gw=True)[0] is None


def test_no_tokens():
    idx, x = torch.empty(0, 2, dtype=torch.long, device=DEV), torch.randn(0, 42, device=DEV, requires_grad=True)
    x_sorted, sorted_pos, counts, offsets = moe_dispatch(x, idx, 3)
    assert x_sorted.shape == (0, 42) and sorted_pos.shape == (0,)
    assert counts.tolist() == [0, 0, 0] and offsets.tolist() == [0, 0, 0, 0]
    out = moe_combine(x_sorted, sorted_pos, torch.rand(0, 2, device=DEV, requires_grad=True))
    assert out.shape == (0, 42)
    out.sum().backward()
    assert x.grad.shape == (0, 42)


def test_bad_permutation_is_memory_safe():
    "A sorted_pos that is not a permutation gives wrong numbers but no out-of-bounds access."
    y, w = torch.randn(12, 8, device=DEV), torch.rand(6, 2, device=DEV)
    out = moe_combine(y, torch.zeros(12, dtype=torch.long, device=DEV), w)
    assert out.shape == (6, 8)


def test_errors():
    x = torch.randn(6, 8, device=DEV)
    idx = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3]], device=DEV)
    neg = idx.clone(); neg[2, 1] = -1
    for fn in (moe_dispatch, moe_dispatch_ref):
        with pytest.raises(ValueError, match="x must be 2-D"): fn(x[None], idx, 4)
        with pytest.raises(ValueError, match="topk_idx must be 2-D"): fn(x, idx.reshape(-1), 4)
        with pytest.raises(TypeError, match="integer expert ids"): fn(x, idx.float(), 4)
        with pytest.raises(ValueError, match="topk_idx has 6 tokens .* but x has 5"): fn(x[:5], idx, 4)
        with pytest.raises(ValueError, match=r"expert ids in \[0, 3\] but num_experts=3"): fn(x, idx, 3)
        with pytest.raises(ValueError, match=r"expert ids in \[-1, 3\] but num_experts=4"): fn(x, neg, 4)
        with pytest.raises(ValueError, match="num_experts must be a positive int"): fn(x, idx, 0)
        huge = idx.clone(); huge[0, 0] = 2**32 + 1  # would wrap to 1 in int32: must still be caught
        with pytest.raises(ValueError, match=r"expert ids in \[0, 4294967297\] but num_experts=4"): fn(x, huge, 4)
        with pytest.raises(ValueError, match=r"expert ids in \[0, 255\]"): fn(x, (idx - 1).to(torch.uint8), 4)
        with pytest.raises(ValueError, match="move both to one device"): fn(x, idx.to("meta"), 4)
    y, sp, w = torch.randn(12, 8, device=DEV), torch.randperm(12, device=DEV), torch.rand(6, 2, device=DEV)
    for fn in (moe_combine, moe_combine_ref):
        with pytest.raises(ValueError, match="y_sorted must be 2-D"): fn(y[None], sp, w)
        with pytest.raises(ValueError, match="topk_weights must be a 2-D float"): fn(y, sp, w.reshape(-1))
        with pytest.raises(ValueError, match="sorted_pos must be a 1-D integer"): fn(y, sp.float(), w)
        with pytest.raises(ValueError, match=r"sorted_pos has 10 entries but topk_weights is \(6, 2\)"): fn(y, sp[:10], w)
        with pytest.raises(ValueError, match="y_sorted has 10 rows"): fn(y[:10], sp, w)
        with pytest.raises(ValueError, match="must be on one device"): fn(y, sp, w.to("meta"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal only shows without a GPU")
def test_cpu_tensor_refused_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # interpreting() reads the variable at call time
    with pytest.raises(RuntimeError, match="call moe_dispatch_ref instead"):
        moe_dispatch(torch.randn(6, 8), torch.zeros(6, 2, dtype=torch.long), 4)
    with pytest.raises(RuntimeError, match="call moe_combine_ref instead"):
        moe_combine(torch.randn(12, 8), torch.arange(12), torch.rand(6, 2))
