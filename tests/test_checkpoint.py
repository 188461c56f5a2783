"""Checkpoints: exact resume, interrupted saves, keep-last-K, errors, and 2-rank (gloo) save -> 1-rank load."""
import os, random, socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qwen3_scratch.data.sampler import ResumableSampler
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model
from qwen3_scratch.training.checkpoint import (MARKER, Checkpointer, complete_checkpoints, export_hf, load_checkpoint,
                                               prune_checkpoints, resolve_resume, rng_state, save_checkpoint,
                                               set_rng_state)

CFG = dict(vocab_size=256, num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
           num_key_value_heads=2, head_dim=16, kernels="torch")


def make(seed=0):
    torch.manual_seed(seed)
    m = Qwen3Model(ModelConfig.from_preset("debug", **CFG))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    return m, opt, sch, ResumableSampler(64, seed=1)


def train(m, opt, sch, smp, n):
    losses = []
    for _ in range(n):
        idx = next(iter(smp)); smp.advance(1)
        ids = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(idx))
        ids = torch.where(torch.rand(ids.shape) < 0.1, 0, ids)
        loss = m(ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad(); sch.step()
        losses.append(loss.item())
    return losses


def draws(): return random.random(), float(np.random.rand()), torch.rand(4).tolist()


def test_round_trip_is_exact(tmp_path):
    m, opt, sch, smp = make()
    train(m, opt, sch, smp, 3)
    save_checkpoint(tmp_path, 3, m, opt, sch, smp, tokens_seen=48, extra={"note": "x"})
    snap = rng_state(); expect_draws = draws(); set_rng_state(snap)   # peek without moving the streams
    after = train(m, opt, sch, smp, 3)

    m2, opt2, sch2, smp2 = make(seed=7)
    info = load_checkpoint(resolve_resume("latest", tmp_path), m2, opt2, sch2, smp2)
    assert (info["step"], info["tokens_seen"], info["extra"]) == (3, 48, {"note": "x"})
    assert draws() == expect_draws                       # RNG streams restored
    load_checkpoint(info["path"], m2, opt2, sch2, smp2)  # again, to train from the same point
    assert train(m2, opt2, sch2, smp2, 3) == after       # bitwise-equal losses
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k
    for s1, s2 in zip(opt.state.values(), opt2.state.values()):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    assert sch2.state_dict()["last_epoch"] == sch.state_dict()["last_epoch"] == 6
    assert smp2.state_dict() == smp.state_dict()


def test_interrupted_save_is_ignored(tmp_path):
    m, opt, sch, smp = make()
    ck = Checkpointer(tmp_path, keep_last=None)
    ck.save(1, m, opt, sch, smp)
    train(m, opt, sch, smp, 1)
    ck.save(2, m, opt, sch, smp)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    (tmp_path / "step_000004.tmp").mkdir()               # killed while writing
    (tmp_path / "step_000003").mkdir()                   # killed between rename and marker
    (tmp_path / "step_000003" / "__0_0.distcp").write_bytes(b"partial")
    assert resolve_resume("latest", tmp_path).name == "step_000002"
    m2, opt2, sch2, smp2 = make(seed=3)
    assert ck.load("latest", m2, opt2, sch2, smp2)["step"] == 2
    for k, v in m2.state_dict().items(): assert torch.equal(v, ref[k]), k
    ck.save(3, m, opt, sch, smp)                         # a re-save replaces the unfinished step 3
    assert resolve_resume("latest", tmp_path).name == "step_000003"


def test_keep_last_k(tmp_path):
    m, opt, _, _ = make()
    ck = Checkpointer(tmp_path, keep_last=2)
    for s in range(1, 6): ck.save(s, m, opt)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000004", "step_000005"]
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["step_000004"]
    with pytest.raises(ValueError, match="at least the newest"): prune_checkpoints(tmp_path, 0)
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000005"]


def test_async_save(tmp_path):
    m, opt, sch, smp = make()
    ck = Checkpointer(tmp_path, keep_last=1, async_save=True)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    ck.save(1, m, opt, sch, smp)
    with torch.no_grad():
        for p in m.parameters(): p.add_(1.0)            # after staging: not in the checkpoint
    ck.save(2, m, opt, sch, smp)                         # waits for step 1 first
    ck.wait()
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step_000002"]
    m2, *_ = make(seed=3)
    load_checkpoint(tmp_path / "step_000002", m2, restore_rng=False)
    for k, v in m2.state_dict().items(): assert torch.equal(v, ref[k] + 1.0), k


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"): resolve_resume("latest", tmp_path / "nope")
    (tmp_path / "step_000001.tmp").mkdir(); (tmp_path / "step_000002").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no complete checkpoint in .*step_000001\.tmp.*step_000002"):
        resolve_resume("latest", tmp_path)
    with pytest.raises(FileNotFoundError, match="incomplete"): resolve_resume(tmp_path / "step_000002")
    with pytest.raises(FileNotFoundError, match="incomplete"): resolve_resume(tmp_path / "step_000001.tmp")
    with pytest.raises(ValueError, match="needs ckpt_dir"): resolve_resume("latest")
    with pytest.raises(ValueError, match="keep_last"): Checkpointer(tmp_path, keep_last=0)
    m, opt, sch, smp = make()
    p = save_checkpoint(tmp_path / "c", 1, m)
    assert (p / MARKER).is_file()
    with pytest.raises(ValueError, match="no scheduler state"): load_checkpoint(p, m, scheduler=sch)
    with pytest.raises(ValueError, match="pass model="): load_checkpoint(p, optimizer=opt)
    save_checkpoint(tmp_path / "c", 2, m, sampler=smp)
    with pytest.raises(ValueError, match="world_size"):
        load_checkpoint(tmp_path / "c/step_000002", sampler=ResumableSampler(64, seed=1, world_size=2))


def test_export_hf(tmp_path):
    from qwen3_scratch.model.hf import load_hf
    m, *_ = make()
    export_hf(m, tmp_path / "hf")
    for (k, a), b in zip(m.state_dict().items(), load_hf(tmp_path / "hf").state_dict().values()): assert torch.equal(a, b), k


# ---- multi-process (gloo, CPU): 2 ranks save, 1 rank loads (DCP resharding) -------------------------------------

def _free_port():
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def _save_2ranks(rank, world, port, ckpt_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        m, opt, sch, _ = make(seed=0)                    # same init on both ranks (replicated, as DDP)
        train(m, opt, sch, ResumableSampler(64, seed=1), 2)   # the same data on both ranks: identical replicas
        smp = ResumableSampler(64, rank=rank, world_size=world, seed=1)
        Checkpointer(ckpt_dir, keep_last=2).save(2, m, opt, sch, smp, tokens_seen=64)
        if rank == 0: torch.save({k: v.clone() for k, v in m.state_dict().items()}, os.path.join(ckpt_dir, "ref.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_multiprocess_two_rank_save_one_rank_load(tmp_path):
    "Multi-process (gloo, 2 CPU ranks): the checkpoint written by 2 ranks loads into 1 process."
    mp.spawn(_save_2ranks, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    p = resolve_resume("latest", tmp_path)
    assert sorted(f.name for f in p.iterdir() if f.name.startswith("trainer_rank")) == ["trainer_rank0.pt", "trainer_rank1.pt"]
    m, opt, sch, _ = make(seed=9)
    with pytest.warns(UserWarning, match="saved by 2 ranks"):
        info = load_checkpoint(p, m, opt, sch)
    assert (info["step"], info["tokens_seen"]) == (2, 64)
    assert sch.state_dict()["last_epoch"] == 2
    ref = torch.load(tmp_path / "ref.pt")
    for k, v in m.state_dict().items(): assert torch.equal(v, ref[k]), k
    assert all(int(s["step"]) == 2 for s in opt.state.values())
