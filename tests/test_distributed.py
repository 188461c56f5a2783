"""distributed/ on 2 gloo ranks (CPU): the mesh and rank helpers, the differentiable all-to-all, DDP and FSDP2 from `parallelize` (with gradient
accumulation through `gradient_sync`) equal to one process on the same global batch, and the MoE balancing loss over
the global batch through `SumOverRanks`."""
import copy

import torch

from qwen3_scratch.distributed.comm import SumOverRanks, all_reduce_sum_, all_to_all, barrier, get_rank, get_world_size
from qwen3_scratch.distributed.fsdp import gradient_sync
from qwen3_scratch.distributed.parallel import ParallelDims, parallelize
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model

from ranks import spawn

CFG = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
           intermediate_size=64, kernels="torch")


def _call(rank, world, fn, *args): fn(rank, *args)


def _spawn(fn, *args): spawn(_call, 2, fn, *args)


def _grads(model):
    return {n.replace("module.", ""): (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters()}


def _helpers(rank):
    assert (get_rank(), get_world_size()) == (rank, 2)
    pd = ParallelDims(world_size=2)
    mesh = pd.build_mesh("cpu")
    assert mesh.size() == 2 and pd.build_mesh("cpu") is mesh and pd.meshes["dp"].size() == 2 and pd.meshes["tp"].size() == 1
    t = all_reduce_sum_(torch.tensor([float(rank + 1)]))
    assert t.item() == 3.0
    barrier()


def _all_to_all(rank):
    # rank 0 sends 1 row to itself and 2 to rank 1; rank 1 sends 3 rows to rank 0 and none to itself
    splits = {0: [1, 2], 1: [3, 0]}
    x = torch.arange(3.0).add(10 * rank)[:, None].repeat(1, 2).requires_grad_()   # rows 10r + i
    out_splits = [splits[0][rank], splits[1][rank]]
    y = all_to_all(x, out_splits, splits[rank])
    want = {0: [0.0, 10.0, 11.0, 12.0], 1: [1.0, 2.0]}[rank]
    assert y[:, 0].tolist() == want, (rank, y)
    (y * torch.arange(1.0, y.shape[0] + 1)[:, None]).sum().backward()   # the gradient of each row goes back to its sender
    g = {0: [1.0, 1.0, 2.0], 1: [2.0, 3.0, 4.0]}[rank]
    assert x.grad[:, 0].tolist() == g, (rank, x.grad)


def _data_parallel(rank, fsdp):
    torch.manual_seed(0)
    plain = Qwen3Model(ModelConfig.from_preset("debug", **CFG))
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(1)); labels = torch.roll(ids, -1, 1)
    ref = copy.deepcopy(plain)
    ref(ids, labels=labels).loss.backward()                       # one process, the whole global batch of 4
    dp = parallelize(copy.deepcopy(plain), ParallelDims(world_size=2, fsdp=fsdp))
    mine = slice(2 * rank, 2 * rank + 2)                           # this rank's half, in 2 micro-batches of 1
    for i in range(2):
        row = slice(mine.start + i, mine.start + i + 1)
        with gradient_sync(dp, i == 1): (dp(ids[row], labels=labels[row]).loss / 2).backward()
    want, got = _grads(ref), _grads(dp)
    for n in want: torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-6, msg=n)




def _moe_balance(rank):
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("debug", **{**CFG, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16})
    model = Qwen3Model(cfg)
    ids = torch.randint(0, 300, (4, 16), generator=torch.Generator().manual_seed(2))
    full = model(ids).aux_loss                                     # balancing over the global batch, one process
    model.moe_all_reduce = lambda v: SumOverRanks.apply(v, None)
    half = model(ids[2 * rank:2 * rank + 2]).aux_loss             # this rank's half, statistics summed over ranks
    torch.testing.assert_close(half, full, rtol=1e-6, atol=1e-7)
    model.zero_grad(); half.backward()
    g = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "gate" in n and p.grad is not None])
    all_reduce_sum_(g); g /= 2                                     # what DDP's gradient averaging does
    model.zero_grad(); model.moe_all_reduce = None; full.backward()
    want = torch.cat([p.grad.flatten() for n, p in model.named_parameters() if "gate" in n and p.grad is not None])
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-7)


def _all(rank):
    _helpers(rank)
    _all_to_all(rank)
    for fsdp in (False, True): _data_parallel(rank, fsdp)
    _moe_balance(rank)


def test_two_ranks():
    """One pair of processes (starting them costs more than the checks) runs: the mesh and rank helpers; the all-to-all and its reverse gradient;
    DDP, then FSDP2, equal to one process on the same global batch; the MoE balancing loss and its router gradient over the global batch."""
    _spawn(_all)
