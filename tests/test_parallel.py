"""N-D parallelism through `parallelize` on gloo ranks (CPU, float32): every dimension alone and the combinations
FSDP x TP, FSDP x EP, TP x PP, FSDP x CP, PP x CP, HSDP and a 3-D layout (FSDP x TP x PP), on tiny dense and MoE Qwen3 models with
packed documents. Each layout trains 3 AdamW steps exactly as the training loop does (`parallel_batch`, the pipeline's
`forward_backward`, `clip_grad_norm_`, `build_optimizer`), and its losses and every gathered gradient of the first
step equal one process on the whole global batch within 1e-5. Checkpoints saved under one layout load under another
(TP2 x DP2 -> DP4 -> one process; PP2 -> 1; EP2 -> 1), and `export_hf` writes the full weights from FSDP x TP and EP.
One spawn per world size (starting processes costs more than the checks)."""
from pathlib import Path

import torch
import torch.distributed as dist

from qwen3_scratch.distributed.comm import clip_grad_norm_
from qwen3_scratch.distributed.parallel import ParallelDims, Pipeline, parallel_batch, parallelize
from qwen3_scratch.kernels.utils import cu_seqlens_of, document_ids
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model
from qwen3_scratch.training.checkpoint import export_hf, load_checkpoint, save_checkpoint, step_dir
from qwen3_scratch.training.optimizer import build_optimizer
from qwen3_scratch.training.pretrain import lm_loss


TINY = dict(vocab_size=256, hidden_size=32, num_hidden_layers=4, intermediate_size=64, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, kernels="torch", tie_word_embeddings=False)

from ranks import spawn
DENSE = ModelConfig.from_preset("debug").replace(**TINY)
MOE = ModelConfig.from_preset("debug_moe").replace(**TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                                                   mlp_only_layers=[3])
ROWS, T, STEPS, LR = 8, 16, 3, 3e-3


def _spawn(world, fn, *args): spawn(fn, world, *args)


def _batch(step: int, pad: bool = False) -> dict:
    "A global batch of packed documents: ids, next-token labels (`pad`: the first quarter of each row unlabelled) and cu_seqlens."
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, 256, (ROWS, T), generator=g)
    cuts = sorted({int(c) for r in range(ROWS) for c in (r * T + torch.randint(1, T, (2,), generator=g)).tolist()}
                  | {r * T for r in range(ROWS + 1)})
    labels = torch.roll(ids, -1, 1)
    if pad: labels[:, : T // 4] = -100         # under cp=2 only rank 0 holds these tokens: the ranks' label counts differ
    return {"input_ids": ids, "labels": labels, "cu_seqlens": torch.tensor(cuts, dtype=torch.int32)}


def _rows(batch: dict, rows: slice) -> dict:
    "The rows of a packed batch, with their own cu_seqlens."
    doc = document_ids(batch["cu_seqlens"], *batch["input_ids"].shape)[0][rows]
    return {"input_ids": batch["input_ids"][rows], "labels": batch["labels"][rows], "cu_seqlens": cu_seqlens_of(doc)}


def _grads(module) -> dict:
    out = {}
    for n, p in module.named_parameters():
        if p.grad is None: continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        out[n.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")] = g.detach().clone()
    return out


def _reference(cfg, pad: bool = False):
    "One process on the whole global batch: the losses of STEPS AdamW steps and the gradients of the first."
    torch.manual_seed(0)
    model = Qwen3Model(cfg)
    opt = build_optimizer(model, LR)
    losses, grads = [], None
    for s in range(STEPS):
        loss = lm_loss(model, _batch(s, pad))[0]
        loss.backward()
        if s == 0: grads = _grads(model)
        clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads, model


def _train(cfg, pd: ParallelDims, ac: str = "none", pad: bool = False, **kw):
    "The same steps under layout `pd`, as the training loop runs them; (losses, first-step gradients, module, dp_model, opt)."
    torch.manual_seed(0)
    model = Qwen3Model(cfg)
    dp = parallelize(model, pd, activation_checkpointing=ac, **kw)
    module = dp.module if isinstance(dp, Pipeline) else model
    opt = build_optimizer(module, LR)
    n, i = pd.dp, pd.dp_rank(dist.get_rank())
    losses, grads = [], None
    for s in range(STEPS):
        mine = _rows(_batch(s, pad), slice(i * ROWS // n, (i + 1) * ROWS // n))       # this data-parallel slice
        local, context = parallel_batch(mine, dp, pd)
        with context:
            if isinstance(dp, Pipeline): loss = dp.forward_backward(local, 1.0)[0]
            else:
                loss = lm_loss(dp, local)[0]
                loss.backward()
        loss = (loss.full_tensor() if hasattr(loss, "full_tensor") else loss).detach().clone(); mine = mine
        dist.all_reduce(loss); loss /= dist.get_world_size()                   # the mean over the data slices
        if s == 0: grads = _grads(module)
        if isinstance(dp, Pipeline): dp.clip_grad_norm_(1.0)
        else: clip_grad_norm_(module.parameters(), 1.0, foreach=True)
        opt.step(); opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, grads, module, dp, opt


def _measured(module, opt) -> dict:
    "Bytes this rank really holds: its weights' local shards, their gradients and AdamW's moments."
    local = lambda t: (t.to_local() if hasattr(t, "to_local") else t)
    params = {id(p): p for p in module.parameters()}.values()
    n = sum(local(p).numel() * p.element_size() for p in params)
    state = sum(local(v).numel() * v.element_size() for s in opt.state.values() for k, v in s.items() if k != "step")
    return {"params": n, "optimizer": state}


def _check(name, cfg, pd, ref, sizes=None, **kw):
    want_losses, want_grads, _ = ref
    losses, grads, module, dp, opt = _train(cfg, pd, **kw)
    if sizes is not None: torch.save(_measured(module, opt), Path(sizes) / f"{dist.get_rank()}.pt")
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-5, atol=1e-5, msg=f"{name} losses")
    assert grads, name
    for n, g in grads.items():
        torch.testing.assert_close(g, want_grads[n], rtol=1e-5, atol=1e-5, msg=lambda m: f"{name} {n}: {m}")
    if not isinstance(dp, Pipeline): assert set(grads) == set(want_grads), (name, set(want_grads) - set(grads))
    return module, dp, opt


def _full(module, pp_group=None) -> dict:
    from qwen3_scratch.training.checkpoint import full_state
    return full_state(module, pp_group)


def _two(rank, world, tmp):
    dense, moe = _reference(DENSE), _reference(MOE)
    _check("fsdp2", DENSE, ParallelDims(world_size=2, fsdp=True), dense)
    _check("ddp2", DENSE, ParallelDims(world_size=2), dense)
    _check("tp2", DENSE, ParallelDims(world_size=2, tp=2), dense)
    _check("tp2 no-sp", DENSE, ParallelDims(world_size=2, tp=2), dense, sequence_parallel=False)
    _check("cp2", DENSE, ParallelDims(world_size=2, cp=2), dense)
    _check("cp2 fsdp ac", DENSE, ParallelDims(world_size=2, cp=2, fsdp=True), dense, ac="full")
    _check("cp2 padded", DENSE, ParallelDims(world_size=2, cp=2, fsdp=True), _reference(DENSE, pad=True), pad=True)
    _check("cp2 moe padded", MOE, ParallelDims(world_size=2, cp=2), _reference(MOE, pad=True), pad=True)   # DDP
    for sched in ("1F1B", "GPipe", "Interleaved1F1B"):
        module, dp, opt = _check(f"pp2 {sched}", DENSE, ParallelDims(world_size=2, pp=2), dense, pp_schedule=sched,
                                 pp_microbatches=4)
    save_checkpoint(Path(tmp) / "pp2", 3, module, opt)                      # the interleaved pipeline's weights
    torch.save(_full(module, dp.group), Path(tmp) / "pp2.pt") if rank == 0 else _full(module, dp.group)
    _check("pp2 moe", MOE, ParallelDims(world_size=2, pp=2), moe, pp_microbatches=2)
    module, dp, opt = _check("ep2 fsdp", MOE, ParallelDims(world_size=2, ep=2, fsdp=True), moe)
    save_checkpoint(Path(tmp) / "ep2", 3, module, opt)
    full = _full(module)
    if rank == 0: torch.save(full, Path(tmp) / "ep2.pt")
    export_hf(module, Path(tmp) / "ep2_hf")
    _check("tp2 moe", MOE, ParallelDims(world_size=2, tp=2, fsdp=True), moe)


def _four(rank, world, tmp):
    dense, moe = _reference(DENSE), _reference(MOE)
    module, dp, opt = _check("fsdp2 x tp2", DENSE, ParallelDims(world_size=4, tp=2, fsdp=True), dense)
    save_checkpoint(Path(tmp) / "tp2dp2", 3, module, opt)
    saved = _full(module)
    export_hf(module, Path(tmp) / "tp2dp2_hf")                               # from a 2-D (FSDP x TP) layout
    # the same checkpoint under another layout: FSDP over 4 ranks, weights and optimizer state resharded by DCP
    torch.manual_seed(1)
    other = Qwen3Model(DENSE)
    parallelize(other, ParallelDims(world_size=4, fsdp=True))
    opt4 = build_optimizer(other, LR)
    load_checkpoint(step_dir(Path(tmp) / "tp2dp2", 3), other, opt4)
    for k, v in _full(other).items(): torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    save_checkpoint(Path(tmp) / "dp4", 3, other, opt4)
    if rank == 0: torch.save(saved, Path(tmp) / "tp2dp2.pt")
    _check("tp2 x pp2", DENSE, ParallelDims(world_size=4, tp=2, pp=2, fsdp=True), dense, pp_microbatches=2,
           sizes=Path(tmp) / "sizes")
    _check("fsdp2 x cp2", DENSE, ParallelDims(world_size=4, cp=2, fsdp=True), dense)
    _check("pp2 x cp2 ac", DENSE, ParallelDims(world_size=4, pp=2, cp=2, fsdp=True), dense, pp_microbatches=2, ac="full")
    _check("pp2 x cp2 padded", DENSE, ParallelDims(world_size=4, pp=2, cp=2, fsdp=True), _reference(DENSE, pad=True),
           pp_microbatches=2, pad=True)                   # the cp ranks hold different numbers of labels: still exact
    _check("pp2 x cp2 moe interleaved", MOE, ParallelDims(world_size=4, pp=2, cp=2, fsdp=True), moe,
           pp_schedule="Interleaved1F1B", pp_microbatches=2)
    _check("hsdp 2x2", DENSE, ParallelDims(world_size=4, fsdp=True, dp_replicate=2), dense)
    _check("fsdp4 x ep2", MOE, ParallelDims(world_size=4, ep=2, fsdp=True), moe)
    _check("fsdp2 x ep2 x cp2", MOE, ParallelDims(world_size=4, ep=2, cp=2, fsdp=True), moe)
    _check("fsdp2 x ep2 x tp2", MOE, ParallelDims(world_size=4, ep=2, tp=2, fsdp=True), moe)


def _eight(rank, world, tmp):
    _check("fsdp2 x tp2 x pp2", DENSE, ParallelDims(world_size=8, tp=2, pp=2, fsdp=True), _reference(DENSE), pp_microbatches=2)


def _one_process(tmp, name, cfg):
    "A checkpoint saved under a parallel layout, loaded by one process: the saved full weights."
    model = Qwen3Model(cfg)
    load_checkpoint(step_dir(Path(tmp) / name, 3), model, build_optimizer(model, LR))
    saved = torch.load(Path(tmp) / f"{name}.pt")
    for k, v in model.state_dict().items():
        if k in saved: torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)
    assert set(saved) <= set(model.state_dict()), name


def test_two_ranks(tmp_path):
    """Each dimension alone (FSDP2, DDP, TP with and without sequence parallelism, CP, CP with FSDP and activation
    checkpointing, PP with 1F1B / GPipe / Interleaved1F1B, PP and EP and TP on an MoE model) equals one process; PP2 and
    EP2 checkpoints load into one process; `export_hf` from EP2 writes the full weights."""
    _spawn(2, _two, str(tmp_path))
    _one_process(tmp_path, "pp2", DENSE)
    _one_process(tmp_path, "ep2", MOE)
    from qwen3_scratch.model.hf import load_hf
    saved, hf = torch.load(tmp_path / "ep2.pt"), load_hf(tmp_path / "ep2_hf").state_dict()
    for k, v in saved.items(): torch.testing.assert_close(hf[k].float(), v.float(), rtol=0, atol=0, msg=k)


def test_four_ranks(tmp_path):
    """FSDP x TP, TP x PP, FSDP x CP, PP x CP (with activation checkpointing; MoE interleaved), HSDP, FSDP x EP, EP x CP and EP x TP equal one process; a TP2 x DP2 checkpoint
    loads under FSDP4 (weights and optimizer resharded) and into one process; the dry run's bytes per rank for the
    TP2 x PP2 layout equal what the ranks of each stage really hold."""
    from qwen3_scratch.distributed.dry_run import dry_run
    plan = dry_run(DENSE, ParallelDims(world_size=4, tp=2, pp=2, fsdp=True), micro_batch=ROWS // 2, seq_len=T,
                   pp_microbatches=2)
    (tmp_path / "sizes").mkdir()
    _spawn(4, _four, str(tmp_path))
    for st in plan.stages:                                   # rank 0 (stage 0) and rank 2 (stage 1)
        got = torch.load(tmp_path / "sizes" / f"{st.rank}.pt")
        assert (st.memory["params"], st.memory["optimizer"]) == (got["params"], got["optimizer"]), (st.rank, st.memory, got)
    _one_process(tmp_path, "tp2dp2", DENSE)
    saved = torch.load(tmp_path / "tp2dp2.pt")
    from qwen3_scratch.model.hf import load_hf
    hf = load_hf(tmp_path / "tp2dp2_hf").state_dict()
    for k, v in saved.items(): torch.testing.assert_close(hf[k].float(), v.float(), rtol=0, atol=0, msg=k)
    model = Qwen3Model(DENSE)
    load_checkpoint(step_dir(tmp_path / "dp4", 3), model)
    for k, v in model.state_dict().items(): torch.testing.assert_close(v, saved[k], rtol=0, atol=0, msg=k)


def test_eight_ranks(tmp_path):
    "A 3-D layout, FSDP2 x TP2 x PP2, equals one process."
    _spawn(8, _eight, str(tmp_path))
