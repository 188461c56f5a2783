"""The parallel plans on one GPU, where the Triton kernels run: a one-rank NCCL group. FSDP2 (bf16 compute, float32
reduce) over the whole model equals the plain model; ring attention's kernel path (FlashAttention's forward and backward
with its log-sum-exp, per chunk pair) equals FlashAttention over the whole sequence, packed documents included; expert
parallelism with the Triton dispatch / combine kernels equals the plain MoE model; a pipeline whose stages run the ring
(PP x CP) equals the plain model on packed documents. Skipped without CUDA."""
import copy, os, socket

import pytest
import torch
import torch.distributed as dist

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the Triton kernel paths)")

from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.transformer import Qwen3Model  # noqa: E402


@pytest.fixture(scope="module")
def nccl():
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    yield
    dist.barrier(); dist.destroy_process_group()


def _mesh(name):
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh("cuda", (1,), mesh_dim_names=(name,))


def _close(a, b, tol, what):
    err = (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)
    assert err < tol, f"{what}: relative error {err:.2e} >= {tol}"


def test_fsdp2_one_gpu(nccl):
    from qwen3_scratch.distributed.fsdp import apply_fsdp
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug")
    with torch.device("cuda"): plain = Qwen3Model(cfg)
    sharded = apply_fsdp(copy.deepcopy(plain), _mesh("dp_shard_cp"), param_dtype=torch.bfloat16)
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda"); labels = torch.roll(ids, -1, 1)
    with torch.autocast("cuda", torch.bfloat16): want = plain(ids, labels=labels).loss
    got = sharded(ids, labels=labels).loss
    got.backward(); want.backward()
    assert abs(got.item() - want.item()) < 2e-2, (got.item(), want.item())
    g = dict(sharded.named_parameters())["layers.0.self_attn.q_proj.weight"].grad.full_tensor()
    assert g.dtype == torch.float32                                       # reduced in float32
    _close(g, plain.layers[0].self_attn.q_proj.weight.grad, 5e-2, "q_proj grad")


@pytest.mark.parametrize("docs", [False, True])
def test_ring_attention_kernel_path(nccl, docs):
    from qwen3_scratch.distributed.context_parallel import RingAttention, cp_context
    from qwen3_scratch.kernels.flash_attn import flash_attention
    from qwen3_scratch.kernels.utils import document_ids
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 8, 2, 1024, 128
    q = torch.randn(B, Hq, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    cu = torch.tensor([0, 300, 1024, 1500, 2048], device="cuda", dtype=torch.int32) if docs else None
    want = flash_attention(q, k, v, causal=True, softmax_scale=D ** -0.5, cu_seqlens=cu)[0]
    gw = torch.autograd.grad(want.float().square().sum(), (q, k, v))
    ring = RingAttention(dist.group.WORLD, kernels="auto", scale=D ** -0.5)
    doc = document_ids(cu, B, T)[0] if docs else None
    with cp_context(ring, doc_ids=doc):                              # one rank: chunks 0 and 1, the kernel per pair
        got = ring(q, k, v)
        gg = torch.autograd.grad(got.float().square().sum(), (q, k, v))
    _close(got, want, 2e-2, "ring out")
    for a, b, n in zip(gg, gw, "qkv"): _close(a, b, 3e-2, f"d{n}")


def test_expert_parallel_triton_kernels(nccl):
    from qwen3_scratch.distributed.expert_parallel import apply_ep
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug_moe").replace(num_hidden_layers=2)
    with torch.device("cuda"): plain = Qwen3Model(cfg)
    ep = apply_ep(copy.deepcopy(plain), _mesh("ep"))
    ids = torch.randint(0, cfg.vocab_size, (2, 256), device="cuda"); labels = torch.roll(ids, -1, 1)
    with torch.autocast("cuda", torch.bfloat16):
        want, got = plain(ids, labels=labels).loss, ep(ids, labels=labels).loss
    want.backward(); got.backward()
    assert abs(got.item() - want.item()) < 1e-2, (got.item(), want.item())
    a = ep.layers[0].mlp.experts.gate_up_proj.grad.full_tensor()
    _close(a, plain.layers[0].mlp.experts.gate_up_proj.grad, 5e-2, "expert grad")


def test_pipeline_with_ring_attention_one_gpu(nccl):
    "A pipeline whose stages' attention is the ring (PP x CP on one rank each): the Triton path per micro-batch, packed docs."
    from qwen3_scratch.distributed.context_parallel import apply_cp
    from qwen3_scratch.distributed.pipeline_parallel import build_pipeline
    from qwen3_scratch.kernels.utils import document_ids
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug").replace(tie_word_embeddings=False, gradient_checkpointing=True)
    with torch.device("cuda"): plain = Qwen3Model(cfg)
    B, T = 4, 512
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda"); labels = torch.roll(ids, -1, 1); labels[0, :100] = -100
    cu = torch.tensor([0, 200, 512, 700, 1024, 1536, 1800, 2048], device="cuda", dtype=torch.int32)
    doc, pos = document_ids(cu, B, T)
    cp = dist.new_group([0])
    pipe = build_pipeline(copy.deepcopy(plain), _mesh("pp"), "1F1B", microbatches=2, parallelize_stage=lambda s: apply_cp(s, cp))
    with torch.autocast("cuda", torch.bfloat16):
        want = plain(ids, labels=labels, cu_seqlens=cu).loss
        got = pipe.forward_backward({"input_ids": ids, "labels": labels, "doc_ids": doc, "position_ids": pos})[0]
    want.backward()
    assert abs(got.item() - want.item()) < 2e-2, (got.item(), want.item())
    g = pipe.stage_models[0].layers["0"].self_attn.q_proj.weight.grad
    _close(g, plain.layers[0].self_attn.q_proj.weight.grad, 5e-2, "q_proj grad")
