"""Tensor parallelism on 2 gloo ranks (CPU): TP=2 with and without sequence parallelism, for a dense tied, a dense untied
and an MoE model, equals one process: the losses of 3 AdamW steps and every gathered gradient after the first. Also:
padding (labels -100 and an attention mask), gradient accumulation, the loss outside `loss_parallel`, the bytes every
collective moves (= `tp_comm_bytes`, in float32 and under bf16 autocast), no all-gather of the head's weight, and the
refusals of `apply_tp`. One spawn per model family; the plan and the byte arithmetic are checked in this process."""
import copy
from contextlib import nullcontext

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard

from qwen3_scratch.distributed.activation_checkpoint import apply_ac
from qwen3_scratch.distributed.tensor_parallel import (CollectiveBytes, ReplicateCompute, apply_tp, check_tp, tp_comm_bytes,
                                                       tp_loss_context, tp_plan)
from qwen3_scratch.errors import ConfigError
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model


TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, kernels="torch")

from ranks import spawn
DENSE = ModelConfig.from_preset("debug").replace(**TINY)                            # tied, as the debug preset
UNTIED = DENSE.replace(tie_word_embeddings=False)
MOE = ModelConfig.from_preset("debug_moe").replace(**TINY, moe_intermediate_size=32, mlp_only_layers=[1])  # MoE + dense layer
B, T = 2, 16


def _call(rank, world, fn, *args): fn(init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)), *args)


def _spawn(fn, *args): spawn(_call, 2, fn, *args)


def _batch(seed):
    "ids, attention_mask and labels (B, T): row 1 padded at the end (mask 0, label -100), one more label ignored."
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, T), generator=g); labels = torch.roll(ids, -1, 1)
    mask = torch.ones(B, T, dtype=torch.long); mask[1, -5:] = 0; labels[1, -5:] = -100; labels[0, 3] = -100
    return ids, mask, labels


def _pair(cfg, mesh, sp, lp=True):
    torch.manual_seed(0)
    ref = Qwen3Model(cfg)
    return ref, apply_tp(copy.deepcopy(ref), mesh, sp, lp)


def _check_grads(tp, ref, tol=1e-5):
    want = dict(ref.named_parameters())
    for n, p in tp.named_parameters():
        assert p.grad.placements == p.placements, (n, p.grad.placements)      # Partial gradients were reduced
        torch.testing.assert_close(p.grad.full_tensor(), want[n].grad, rtol=0, atol=tol, msg=n)


def _train_equal(mesh, cfg, sp, lp=True):
    "3 AdamW steps (foreach, with clipping, as the training loop) on TP and on one process: equal losses, equal gradients after step 1."
    ref, tp = _pair(cfg, mesh, sp, lp)
    assert all(hasattr(p, "placements") for p in tp.parameters())             # all DTensors: foreach AdamW and clipping work
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True) for m in (ref, tp)]
    for step in range(3):
        ids, mask, labels = _batch(step)
        want = ref(ids, attention_mask=mask, labels=labels).loss; want.backward()
        with tp_loss_context(tp):
            got = tp(ids, attention_mask=mask, labels=labels).loss; got.backward()
        assert abs(float(got) - float(want)) < 1e-5, (step, float(got), float(want))
        if step == 0: _check_grads(tp, ref)
        n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0, foreach=True)
        n_tp = torch.nn.utils.clip_grad_norm_(tp.parameters(), 1.0, foreach=True).full_tensor()
        torch.testing.assert_close(n_tp, n_ref, rtol=1e-5, atol=1e-6)
        for o in opts: o.step(); o.zero_grad()


def _bytes_equal(mesh, cfg, sp, lp=True, autocast=False):
    "The bytes CollectiveBytes counts in one forward + backward equal tp_comm_bytes; the head's weight is never gathered."
    _, tp = _pair(cfg, mesh, sp, lp)
    ids, mask, labels = _batch(0)
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast), tp_loss_context(tp), CollectiveBytes(2) as moved:
        tp(ids, attention_mask=mask, labels=labels).loss.backward()
    want = tp_comm_bytes(cfg, B, T, 2, 2 if autocast else 4, sp, residual_bytes=4, loss_parallel=lp)
    assert {k: round(moved.bytes.get(k, 0)) for k in want} == want, (sp, lp, autocast, moved.bytes, want)
    assert not any(shape == (cfg.vocab_size // 2, cfg.hidden_size) for _, shape, _ in moved.log)


def _accumulate(mesh, cfg):
    "Two micro-batches of half the loss each: the accumulated (then reduced) gradients equal one process's."
    ref, tp = _pair(cfg, mesh, True)
    for seed in (0, 1):
        ids, mask, labels = _batch(seed)
        (ref(ids, attention_mask=mask, labels=labels).loss / 2).backward()
        with tp_loss_context(tp): (tp(ids, attention_mask=mask, labels=labels).loss / 2).backward()
    _check_grads(tp, ref)


def _refusals(mesh):
    with pytest.raises(ConfigError, match="key/value heads"): apply_tp(Qwen3Model(DENSE.replace(num_key_value_heads=1)), mesh)
    with pytest.raises(ConfigError, match="already wrapped"): apply_tp(apply_ac(Qwen3Model(DENSE)), mesh)
    with pytest.raises(ConfigError, match=r"mesh\['tp'\]"):
        apply_tp(Qwen3Model(DENSE), init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp")))


def _dense_tied(mesh):
    for sp in (True, False):
        _train_equal(mesh, DENSE, sp)
        for lp in (True, False):
            for autocast in (False, True): _bytes_equal(mesh, DENSE, sp, lp, autocast)
    _train_equal(mesh, DENSE, True, lp=False)                                     # the loss on gathered logits
    _accumulate(mesh, DENSE)
    _refusals(mesh)


def _dense_untied(mesh):
    for sp in (True, False): _train_equal(mesh, UNTIED, sp)


def _moe(mesh):
    for sp in (True, False):
        _train_equal(mesh, MOE, sp)
        _bytes_equal(mesh, MOE, sp, autocast=sp)


def test_dense_tied():
    """Dense, tied embeddings: TP with and without SP equals one process (3 AdamW steps, gradients); the bytes of every
    mode, in float32 and bf16 autocast; the loss outside loss_parallel; accumulation; the refusals of apply_tp."""
    _spawn(_dense_tied)


def test_dense_untied():
    "Dense, untied head (lm_head's weight vocabulary-sharded, its module never called): TP equals one process."
    _spawn(_dense_untied)


def test_moe():
    """MoE layer (replicated over the TP ranks) next to a dense one: TP with and without SP equals one process, balancing
    loss and router gradients included; the bytes moved."""
    _spawn(_moe)


def test_plan_and_bytes_one_process():
    "The plan's keys and styles per layer kind, the head check, and tp_comm_bytes' arithmetic, without a process group."
    moe = Qwen3Model(MOE)
    plan = tp_plan(moe, sequence_parallel=True)
    assert isinstance(plan["layers.0.mlp"], ReplicateCompute) and "layers.0.mlp.gate_proj" not in plan
    assert plan["layers.1.mlp.down_proj"].output_layouts == (Shard(1),) and "lm_head" in plan
    assert tp_plan(moe, sequence_parallel=False)["layers.1.self_attn.o_proj"].output_layouts == (Replicate(),)
    assert "lm_head" not in tp_plan(Qwen3Model(DENSE))
    check_tp(DENSE, 2)
    with pytest.raises(ConfigError, match="attention heads"): check_tp(DENSE, 3)
    assert isinstance(tp_loss_context(False), nullcontext) and isinstance(tp_loss_context(moe), nullcontext)
    assert set(tp_comm_bytes(DENSE, 1, 8, 1, 2).values()) == {0}
    big = ModelConfig.from_preset("small")
    one, two = tp_comm_bytes(big, 1, 4096, 4, 2), tp_comm_bytes(big, 2, 4096, 4, 2)
    assert two["all_gather"] == 2 * one["all_gather"] and two["reduce_scatter"] == 2 * one["reduce_scatter"]
    no_sp = tp_comm_bytes(big, 1, 4096, 4, 2, sequence_parallel=False)
    assert abs(one["all_gather"] + one["reduce_scatter"] - no_sp["all_reduce"]) < 1e-3 * no_sp["all_reduce"]
