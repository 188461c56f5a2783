"""Fused SwiGLU kernel against the PyTorch reference: output and both gradients, poisoned outputs, odd shapes, views.

Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one it adds bf16 at real sizes."""
import pytest
import torch

triton = pytest.importorskip("triton")
from qwen3_scratch.kernels.swiglu import swiglu  # noqa: E402
from qwen3_scratch.kernels.utils import assert_close, poison_outputs, test_device  # noqa: E402
from qwen3_scratch.model.ffn import swiglu as swiglu_ref  # noqa: E402

DEV = test_device()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (shape, layout): contiguous (one long row), halves of a fused gate_up projection (row-strided), transposed (copied)
CPU_CASES = [((6, 431), "contiguous"), ((3, 7, 42), "chunk"), ((123,), "contiguous"), ((42, 6), "transposed"),
             ((2, 5, 4096 + 123), "chunk"), ((0, 431), "contiguous")]
GPU_CASES = [((16384, 6144), "contiguous"), ((4, 4096, 12288), "contiguous"), ((8192, 3072), "chunk"),
             ((5, 431), "contiguous"), ((1000, 768), "transposed")]


def run(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    if layout == "chunk": a, b = (torch.randn(*shape[:-1], 2 * shape[-1], generator=g) * 3).to(DEV, dtype).chunk(2, -1)
    elif layout == "transposed": a, b = [(torch.randn(*shape[::-1], generator=g) * 3).to(DEV, dtype).mT for _ in range(2)]
    else: a, b = [(torch.randn(*shape, generator=g) * 3).to(DEV, dtype) for _ in range(2)]
    dy = torch.randn(*shape, generator=g).to(DEV, dtype)
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    with poison_outputs():
        y = swiglu(a, b)
        y.backward(dy)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    y64 = swiglu_ref(a64, b64)
    y64.backward(dy.double())
    for name, out, ref in (("y", y, y64), ("d_gate", a.grad, a64.grad), ("d_up", b.grad, b64.grad)):
        assert_close(out, ref, dtype=dtype, name=name)
        assert out.dtype == dtype and out.shape == torch.Size(shape)
    assert not y._is_view()  # so that in-place ops on it work later


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,layout", CPU_CASES, ids=str)
def test_matches_reference(shape, layout, dtype):
    run(shape, layout, dtype, seed=hash((shape, layout, str(dtype))) % 1000)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape,layout", GPU_CASES, ids=str)
def test_bf16_gpu_sizes(shape, layout):
    run(shape, layout, torch.bfloat16, seed=1)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # the interpreter's numpy; inf -> sigmoid 0
def test_extreme_gates():
    a = torch.tensor([-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4], device=DEV)  # exp overflow must not give NaN
    b = torch.full_like(a, 1.5)
    a, b = a.requires_grad_(), b.requires_grad_()
    y = swiglu(a, b)
    y.sum().backward()
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    swiglu_ref(a64, b64).sum().backward()
    for out, ref in ((y, swiglu_ref(a64, b64)), (a.grad, a64.grad), (b.grad, b64.grad)):
        assert torch.isfinite(out).all()
        assert_close(out, ref)


def test_errors():
    a = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match=r"gate \(4, 8\) and up \(4, 7\) differ"): swiglu(a, a[:, :7])
    with pytest.raises(TypeError, match="cast them to one dtype"): swiglu(a, a.half())
    with pytest.raises(TypeError, match="floating point"): swiglu(a.long(), a.long())
    with pytest.raises(ValueError, match="one device"): swiglu(a, a.to("meta"))
