"""Expert parallelism on 2 and 4 gloo ranks (CPU): `ExpertParallelExperts` alone against `Experts` on the same routed
rows (an expert without rows, a rank that receives none, loop and grouped GEMM), `apply_ep` on the whole model, each
rank on its slice of the batch, against one process on the whole batch (loss, every gradient, three AdamW steps), a
DCP checkpoint of 2 EP ranks loaded into one process, and the degrees it refuses."""
import copy, os

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh

from qwen3_scratch.distributed.comm import all_reduce_sum_
from qwen3_scratch.distributed.expert_parallel import ExpertParallelExperts, apply_ep
from qwen3_scratch.errors import ConfigError
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.moe import Experts, dispatch
from qwen3_scratch.model.transformer import Qwen3Model


CFG = dict(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, kernels="torch")

from ranks import spawn
BATCH, SEQ, STEPS = 8, 16, 3


def _cfg(**kw): return ModelConfig.from_preset("debug_moe", **{**CFG, **kw})


def _call(rank, world, fn, *args): fn(rank, world, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)), *args)


def _spawn(fn, world, *args): spawn(_call, world, fn, *args)


def _full(g): return g.full_tensor() if hasattr(g, "full_tensor") else g


def _close(got, want, msg=""): torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=msg)


def _module_vs_experts(rank, world, mesh, counts, grouped):
    "Each rank's rows through the EP module equal `Experts` on the same rows; expert grads sum over ranks (x ep scale)."
    torch.manual_seed(0)
    cfg = _cfg(); experts = Experts(cfg); experts.init_weights()              # the same full weights on every rank
    epx = ExpertParallelExperts(cfg, mesh, experts)
    g = torch.Generator().manual_seed(10 + rank)
    if counts is None:                                                          # real routing through the dispatch
        x = torch.randn(6, cfg.hidden_size, generator=g)
        xs, _, c, _ = dispatch(x, torch.randint(0, 4, (6, 2), generator=g), 4, "torch")
        xs = xs.detach().requires_grad_()
    else:
        c = torch.tensor(counts[rank]); xs = torch.randn(int(c.sum()), cfg.hidden_size, generator=g, requires_grad=True)
    dy = torch.randn(xs.shape[0], cfg.hidden_size, generator=g)
    y = epx(xs, c, grouped); (y * dy).sum().backward()
    gx, xs.grad = xs.grad, None
    y0 = experts(xs, c, grouped)
    if y0.requires_grad: (y0 * dy).sum().backward()                    # Experts gives no rows no graph: zero gradients
    _close(y, y0, "output"); _close(gx, xs.grad if xs.grad is not None else torch.zeros_like(xs), "input gradient")
    for n in ("gate_up_proj", "down_proj"):
        w = getattr(experts, n); want = w.grad.clone() if w.grad is not None else torch.zeros_like(w)
        want = all_reduce_sum_(want) / world                             # every rank's tokens, mean over ranks
        got = getattr(epx, n).grad
        assert got is not None, f"{n}: no gradient on rank {rank}"
        _close(_full(got), want, n)
    return epx


def _module(rank, world, mesh):
    # expert 1 gets no row anywhere, and rank 1 (experts 2, 3) receives nothing: zero, not None, gradients there
    epx = _module_vs_experts(rank, world, mesh, ([3, 0, 0, 0], [2, 0, 0, 0]), False)
    if rank == 1: assert epx.gate_up_proj.grad.to_local().abs().sum() == 0
    _module_vs_experts(rank, world, mesh, ([0, 0, 0, 0], [0, 0, 0, 0]), False)  # nobody sends anything
    for grouped in (False, True): _module_vs_experts(rank, world, mesh, None, grouped)


def _errors(rank, world, mesh):
    with pytest.raises(ConfigError, match="must divide the model's 3 experts"):
        apply_ep(Qwen3Model(_cfg(num_experts=3)), mesh)
    with pytest.raises(ConfigError, match="needs MoE layers"):
        apply_ep(Qwen3Model(_cfg(num_experts=0)), mesh)


def _train(rank, world, mesh, out):
    "apply_ep, each rank on its slice, vs one process on the whole batch: loss and grads of step 1, losses of 3 steps."
    torch.manual_seed(0)
    plain = Qwen3Model(_cfg())
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(1)); labels = torch.roll(ids, -1, 1)
    ref = copy.deepcopy(plain)
    ep = apply_ep(copy.deepcopy(plain), mesh)
    # foreach=False: AdamW's foreach path refuses plain tensors and DTensors in one parameter group
    opt_ref, opt_ep = (torch.optim.AdamW(m.parameters(), lr=1e-2, foreach=False) for m in (ref, ep))
    n = BATCH // world; mine = slice(rank * n, rank * n + n)
    for step in range(STEPS):
        want = ref(ids, labels=labels).loss; want.backward()
        got = ep(ids[mine], labels=labels[mine]).loss; got.backward()
        for p in ep.parameters():                                   # dense gradients averaged over ranks, as DDP does
            if not hasattr(p, "full_tensor"): all_reduce_sum_(p.grad).div_(world)
        _close(all_reduce_sum_(got.detach().clone()) / world, want.detach(), f"loss of step {step}")
        if step == 0:
            g_ref = dict(ref.named_parameters())
            for name, p in ep.named_parameters(): _close(_full(p.grad), g_ref[name].grad, name)
        for o in (opt_ref, opt_ep): o.step(); o.zero_grad()
    if out:
        dcp.save(get_model_state_dict(ep), checkpoint_id=os.path.join(out, "ep"))
        # the trained EP weights, gathered: what the checkpoint must give back exactly (comparing with `ref` after
        # AdamW steps would test Adam's amplification of 1e-7 gradient differences, not the resharding)
        full = {k: _full(v).detach().clone() for k, v in ep.state_dict().items()}
        if rank == 0: torch.save(full, os.path.join(out, "ref.pt"))


def _balance(rank, world, mesh):
    "The balancing loss alone over the EP ranks equals that of the whole batch, and so does its router gradient averaged over ranks."
    torch.manual_seed(0)
    plain = Qwen3Model(_cfg())
    ids = torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
    ep = apply_ep(copy.deepcopy(plain), mesh); n = BATCH // world
    aux = ep(ids[rank * n:rank * n + n]).aux_loss; aux.backward()
    want = plain(ids).aux_loss; want.backward()
    _close(aux.detach(), want.detach(), "aux loss")
    for (name, p), q in zip(ep.named_parameters(), plain.parameters()):
        if "mlp.gate" in name: _close(all_reduce_sum_(p.grad.clone()) / world, q.grad, name)


def _all_two(rank, world, mesh, out):
    _module(rank, world, mesh); _errors(rank, world, mesh); _balance(rank, world, mesh); _train(rank, world, mesh, out)


def test_two_ranks(tmp_path):
    """2 ranks: the module alone, the errors, the balancing gradient, training, and the checkpoint loaded into 1 process."""
    _spawn(_all_two, 2, str(tmp_path))
    model = Qwen3Model(_cfg())                                      # a fresh plain model: other weights until loaded
    sd = model.state_dict()
    dcp.load(sd, checkpoint_id=str(tmp_path / "ep"), no_dist=True)  # (E, 2I, d) from two (E/2, 2I, d) shards
    ref = torch.load(tmp_path / "ref.pt")
    for k, v in ref.items(): torch.testing.assert_close(sd[k], v, rtol=0, atol=0, msg=k)


def test_four_ranks():
    """4 ranks, one expert each: training equal to one process."""
    _spawn(_train, 4, None)
