"""Fused RMSNorm kernel against the PyTorch reference: outputs and both gradients, poisoned outputs, odd shapes.

Without a GPU it runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1); with one it adds bf16 at real sizes."""
import pytest
import torch

triton = pytest.importorskip("triton")
from qwen3_scratch.kernels.rmsnorm import rms_norm  # noqa: E402
from qwen3_scratch.kernels.utils import assert_close, poison_outputs, test_device  # noqa: E402
from qwen3_scratch.model.norm import rms_norm as rms_norm_ref  # noqa: E402

DEV = test_device()
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
CPU_SHAPES = [(6, 42), (2, 3, 123), (431,), (7, 128), (1, 1000)]
GPU_SHAPES = [(16384, 2048), (4, 2048, 32, 128), (3, 4097)]


def run(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(*shape, generator=g) * 2 + 0.3).to(DEV, dtype).requires_grad_()
    w = (torch.randn(shape[-1], generator=g) * 0.5 + 1).to(DEV, dtype).requires_grad_()
    dy = torch.randn(*shape, generator=g).to(DEV, dtype)
    with poison_outputs():
        y = rms_norm(x, w, 1e-6)
        y.backward(dy)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    y64 = rms_norm_ref(x64, w64, 1e-6)
    y64.backward(dy.double())
    return (y, x.grad, w.grad), (y64, x64.grad, w64.grad)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    (y, dx, dw), (y64, dx64, dw64) = run(shape, dtype, seed=hash((shape, str(dtype))) % 1000)
    assert_close(y, y64, tol=TOL[dtype], name="y")
    assert_close(dx, dx64, tol=TOL[dtype], name="dx")
    assert_close(dw, dw64, tol=4 * TOL[dtype], name="dw")
    assert y.dtype == dx.dtype == dw.dtype == dtype


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_bf16_gpu_sizes(shape):
    (y, dx, dw), (y64, dx64, dw64) = run(shape, torch.bfloat16, seed=1)
    assert_close(y, y64, tol=1.6e-2); assert_close(dx, dx64, tol=1.6e-2); assert_close(dw, dw64, tol=3e-2)
    x = torch.randn(*shape, device="cuda", dtype=torch.bfloat16); w = torch.randn(shape[-1], device="cuda", dtype=torch.bfloat16)
    y, yr = rms_norm(x, w).float(), rms_norm_ref(x, w).float()
    # the reference's rounding order: H200 2026-11-22, 99.999% of outputs bit-identical; the rest, where the float32
    # sum rounded x̂ to the neighbouring bf16 value, within two bf16 steps (x̂'s step, then the product's)
    assert (y == yr).float().mean() > 0.999
    assert ((y - yr).abs() <= yr.abs() * 2 * 2 ** -7 + 1e-30).all()


def test_strided_and_mixed_dtypes():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 300, generator=g).to(DEV)[:, 50:250]  # rows with stride 300
    w = torch.randn(200, generator=g).to(DEV)
    assert_close(rms_norm(x, w), rms_norm_ref(x.double(), w.double()), tol=1e-5)
    xb = x.bfloat16()
    assert rms_norm(xb, w).dtype == rms_norm_ref(xb, w).dtype == torch.float32  # bf16 x, fp32 weight -> fp32


def test_errors():
    x = torch.randn(4, 8, device=DEV)
    with pytest.raises(ValueError, match="does not match the last dim"): rms_norm(x, torch.ones(7, device=DEV))
    with pytest.raises(TypeError, match="floating point"): rms_norm(x.long(), torch.ones(8, device=DEV))
