"""Pipeline parallelism on 2 gloo ranks (CPU, fp32): GPipe, 1F1B and interleaved 1F1B (two stages per rank) equal one
process over three AdamW steps (losses, every gradient of step 1, the clipping norm, the validation loss), padded
labels weighted by token, the MoE balancing loss carried through every stage, parameter names that reshard a DCP
checkpoint from 2 ranks to 1 process, and the layouts refused."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.testing import assert_close

from qwen3_scratch.distributed.pipeline_parallel import build_pipeline, summed_cross_entropy
from qwen3_scratch.errors import ConfigError
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model


CFG = dict(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           intermediate_size=64, tie_word_embeddings=False, kernels="torch")

from ranks import spawn
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, router_aux_loss_coef=0.5)  # a coefficient that shows


def _call(rank, world, fn, *args): fn(rank, init_device_mesh("cpu", (world,), mesh_dim_names=("pp",)), *args)


def _model(**extra):
    torch.manual_seed(0)
    return Qwen3Model(ModelConfig.from_preset("debug", **{**CFG, **extra}))


def _batch():
    ids = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1)); labels = torch.roll(ids, -1, 1)
    labels[0, 3:] = -100; labels[2, :10] = -100                    # 3, 16, 6 and 16 real tokens: weighting matters
    return ids, labels


def _reference(model, ids, labels):
    "One process, the whole batch at once: the losses of 3 AdamW steps and the gradients of the first."
    opt, losses, grads = torch.optim.AdamW(model.parameters(), lr=1e-2), [], None
    for i in range(3):
        loss = model(ids, labels=labels).loss; loss.backward()
        if i == 0: grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        losses.append(loss.detach()); opt.step(); opt.zero_grad()
    return torch.stack(losses), grads


def _dense(rank, mesh, ckpt):
    init, ids, labels = _model(), *_batch()
    ref = copy.deepcopy(init)
    want, want_grads = _reference(ref, ids, labels)
    mean_of_means = torch.stack([init(ids[i:i + 1], labels=labels[i:i + 1]).loss for i in range(4)]).mean()
    assert (mean_of_means - want[0]).abs() > 1e-2                  # the micro-batch mean would not pass below
    got = {}
    for schedule in ("GPipe", "1F1B", "Interleaved1F1B"):
        pipe = build_pipeline(copy.deepcopy(init), mesh, schedule, microbatches=4)
        assert (pipe.has_first, pipe.has_last) == (rank == 0, rank == 1)
        opt, losses = torch.optim.AdamW(pipe.parameters(), lr=1e-2), []
        for i in range(3):
            losses.append(pipe.step(ids, labels))
            if i == 0:                                             # each rank checks the parameters it holds, by name
                for m in pipe.stage_models:
                    for n, p in m.named_parameters(): assert_close(p.grad, want_grads[n], rtol=1e-5, atol=1e-7, msg=n)
                norm = pipe.clip_grad_norm_(1e9)                   # the norm over both ranks' stages; nothing clipped
                assert_close(norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in want_grads.values()])))
            opt.step(); opt.zero_grad()
        val = pipe.eval_loss(ids, labels)
        if pipe.has_last:
            got[schedule] = torch.stack(losses)
            assert_close(got[schedule], want, rtol=0, atol=1e-5, msg=schedule)
            with torch.no_grad(): assert_close(val, ref(ids, labels=labels).loss, rtol=0, atol=1e-5)
        else: assert losses == [None] * 3 and val is None
    if rank == 1:                                                  # and so the schedules agree with each other
        assert_close(got["GPipe"], got["1F1B"], rtol=0, atol=1e-6)
        assert_close(got["1F1B"], got["Interleaved1F1B"], rtol=0, atol=1e-6)
    assert [list(m.layers) for m in pipe.stage_models] == [[str(rank)], [str(rank + 2)]]   # looped: stages r and r + 2
    keys = [None, None]
    dist.all_gather_object(keys, list(pipe.state_dict()))
    assert not set(keys[0]) & set(keys[1]) and sorted(keys[0] + keys[1]) == sorted(init.state_dict())
    dcp.save({"model": pipe.state_dict()}, checkpoint_id=ckpt)      # the interleaved pipeline after its 3 steps


def _moe(rank, mesh):
    ids, labels = _batch()
    N = labels.ne(-100).sum()
    for extra, schedule, m in (({}, "GPipe", 1), ({}, "1F1B", 2), ({"mlp_only_layers": [1, 2]}, "Interleaved1F1B", 2)):
        init = _model(**MOE, **extra)                              # mlp_only [1, 2]: stages 1 and 2 carry without adding
        ref, want = copy.deepcopy(init), 0
        for rows in torch.arange(4).chunk(m):                       # one process, the same micro-batches
            out = ref(ids[rows])
            loss = summed_cross_entropy(out.logits, labels[rows]) / N + ref.config.router_aux_loss_coef * out.aux_loss / m
            loss.backward(); want = want + loss.detach()
        if m == 1:
            assert_close(want, init(ids, labels=labels).loss, rtol=0, atol=1e-6)   # exactly Qwen3Model.forward's loss
            ce_only = copy.deepcopy(init)
            summed_cross_entropy(ce_only(ids).logits, labels).div(N).backward()
            gate = "layers.0.mlp.gate.weight"                      # the balancing term moves stage 0's router gradient
            assert (ce_only.get_parameter(gate).grad - ref.get_parameter(gate).grad).abs().max() > 1e-3
        pipe = build_pipeline(copy.deepcopy(init), mesh, schedule, microbatches=m)
        loss = pipe.step(ids, labels)
        if pipe.has_last: assert_close(loss, want, rtol=0, atol=1e-5, msg=schedule)
        for part in pipe.stage_models:
            for n, p in part.named_parameters():
                assert_close(p.grad, ref.get_parameter(n).grad, rtol=1e-5, atol=1e-7, msg=f"{schedule} {n}")


def _refusals(rank, mesh):
    model, (ids, labels) = _model(), _batch()
    for kw, msg in ((dict(schedule="ZeroBubble"), "choose one of GPipe, 1F1B, Interleaved1F1B"),
                    (dict(schedule="1F1B", microbatches=1), "set microbatches >= 2"),
                    (dict(schedule="Interleaved1F1B", microbatches=4, stages_per_rank=1), "stages_per_rank >= 2"),
                    (dict(schedule="Interleaved1F1B", microbatches=4, stages_per_rank=3), "4 decoder layers"),
                    (dict(schedule="GPipe", microbatches=2, stages_per_rank=2), "use Interleaved1F1B")):
        with pytest.raises(ConfigError, match=msg): build_pipeline(model, mesh, **kw)
    with pytest.raises(ConfigError, match="tie_word_embeddings=false"): build_pipeline(_model(tie_word_embeddings=True), mesh)
    pipe = build_pipeline(model, mesh, "GPipe", microbatches=2)
    with pytest.raises(ConfigError, match="multiple of 2"): pipe.step(ids[:3], labels[:3])


def _all(rank, mesh, ckpt):
    _refusals(rank, mesh)
    _dense(rank, mesh, ckpt)
    _moe(rank, mesh)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")   # loading on one process is the point
def test_two_ranks(tmp_path):
    """One pair of processes (starting them costs more than the checks): the refusals, the three schedules against one
    process, the MoE statistics across ranks; then the checkpoint the two ranks wrote loads into one process's model."""
    ckpt = str(tmp_path / "pp2")
    spawn(_call, 2, _all, ckpt)
    ref, (ids, labels) = _model(), _batch()
    _reference(ref, ids, labels)
    one = Qwen3Model(ModelConfig.from_preset("debug", **CFG))         # other weights until the checkpoint loads
    state = {"model": one.state_dict()}
    dcp.load(state, checkpoint_id=ckpt, no_dist=True)
    for n, t in ref.state_dict().items(): assert_close(one.state_dict()[n], t, rtol=0, atol=1e-5, msg=n)
