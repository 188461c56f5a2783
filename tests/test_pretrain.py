"""scripts/train.py pretrain end to end on CPU: exact resume after SIGKILL (also after steps logged past the
checkpoint), a kill inside a checkpoint write, a damaged checkpoint, bad input (one clear error, exit 2), non-finite
losses (skipped; N in a row stop with exit 3), and 2 gloo ranks that save and resume on 1. On a host with 2 GPUs, the
same over NCCL with the Triton kernels (DDP, FSDP2, resume on 1 GPU). Faults are injected by tests/faults.py."""
import json, os, signal, subprocess, sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, str(ROOT / "scripts" / "train.py"), "pretrain", "--config", "pretrain_debug", "train.device=cpu"]


def faulty(*flags):
    "TRAIN through tests/faults.py with fault flags (e.g. --kill-after-ckpt 10)."
    return [sys.executable, str(ROOT / "tests" / "faults.py"), *flags, "--", *TRAIN[2:]]


TINY = ("model.overrides={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
        "head_dim: 16, intermediate_size: 128, kernels: torch}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    words = [f"The {a} {b} sat on the {c}." for a in ("old", "small", "red", "quick", "lazy") for b in ("cat", "dog", "fox")
             for c in ("mat", "hill", "chair", "boat")]
    (d / "a.txt").write_text("\n".join(words * 12) + "\n")
    return d / "a.txt"


def args(out, corpus, steps=20, ckpt=10, extra=()):
    return [TINY, f"out_dir={out}", f"data.files={corpus}", "pretrain.run_stages=[s1]", f"pretrain.stages.s1.steps={steps}",
            "pretrain.stages.s1.seq_len=32", "train.micro_batch_size=2", "train.grad_accum=2", f"checkpoint.every={ckpt}",
            "train.val_every=10", "train.val_batches=2", "log.every=5", "schedule.warmup_steps=2", "checkpoint.export_hf=false",
            "log.progress=false", "log.tensorboard=false", "log.plot=false", *extra]


def run(argv, env=None, cmd=TRAIN, timeout=300):
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([*cmd, *argv], cwd=ROOT, env=e, capture_output=True, text=True, timeout=timeout)


def records(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def by_step(out):
    "step -> (loss, batch_hash), the last record of each step (a resumed run re-logs nothing before its checkpoint)."
    return {r["step"]: (r["loss"], r["batch_hash"]) for r in records(out)}


def test_exact_resume_after_sigkill(tmp_path, corpus):
    a, b = tmp_path / "straight", tmp_path / "killed"
    r = run(args(a, corpus)); assert r.returncode == 0, r.stderr[-3000:]
    r = run(args(b, corpus), cmd=faulty("--kill-after-ckpt", "10"))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step_000010"]
    assert max(by_step(b)) == 10
    r = run(args(b, corpus, extra=["--resume", "latest"])); assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed" in r.stdout
    sa, sb = by_step(a), by_step(b)
    assert sorted(sa) == sorted(sb) == list(range(1, 21))
    for s in range(1, 21): assert sa[s] == sb[s], (s, sa[s], sb[s])   # bitwise-equal losses, same batches
    va = [r["val_loss"] for r in records(a) if "val_loss" in r]
    vb = [r["val_loss"] for r in records(b) if "val_loss" in r]
    assert va == vb and len(va) == 2


def test_resume_after_kill_past_the_checkpoint_logs_each_step_once(tmp_path, corpus):
    "Killed at step 13 after step 10's checkpoint: the resumed run re-takes 11-13 and metrics.jsonl holds each step once."
    a, b = tmp_path / "straight", tmp_path / "killed"
    r = run(args(a, corpus, steps=16, ckpt=10)); assert r.returncode == 0, r.stderr[-3000:]
    r = run(args(b, corpus, steps=16, ckpt=10), cmd=faulty("--kill-at-step", "13"))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    assert max(r["step"] for r in records(b)) == 13
    r = run(args(b, corpus, steps=16, ckpt=10, extra=["--resume", "latest"])); assert r.returncode == 0, r.stderr[-3000:]
    steps = [x["step"] for x in records(b)]
    assert steps == list(range(1, 17)), steps                      # no replayed step twice
    assert by_step(a) == by_step(b)                                  # and bitwise the straight run


def test_damaged_checkpoint_resumes_from_the_newest_intact_one(tmp_path, corpus):
    out, straight = tmp_path / "run", tmp_path / "straight"
    r = run(args(straight, corpus, steps=6, ckpt=2)); assert r.returncode == 0, r.stderr[-3000:]
    r = run(args(out, corpus, steps=4, ckpt=2)); assert r.returncode == 0, r.stderr[-3000:]
    shard = next((out / "checkpoints" / "step_000004").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])       # cut short after it was written
    _one_clear_error(run(args(out, corpus, steps=6, ckpt=2, extra=["--resume", str(out / "checkpoints" / "step_000004")])),
                     "step_000004 is damaged", shard.name)
    r = run(args(out, corpus, steps=6, ckpt=2, extra=["--resume", "latest"])); assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "step_000004 is damaged" in r.stderr and "newest intact" in r.stderr
    assert "resumed" in r.stdout and "step_000002" in r.stdout
    assert by_step(out) == by_step(straight)                         # steps 3-6 retaken from step 2: the same


def test_kill_during_checkpoint_write(tmp_path, corpus):
    out = tmp_path / "run"
    r = run(args(out, corpus, steps=4, ckpt=2), cmd=faulty("--kill-in-ckpt", "4"))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_000002", "step_000004.tmp"], names
    assert any((out / "checkpoints" / "step_000004.tmp").iterdir())           # the write had started
    r = run(args(out, corpus, steps=4, ckpt=2, extra=["--resume", "latest"]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "step_000002" in r.stdout and "stage s1 step 2/4" in r.stdout
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]


def _one_clear_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1, r.stderr
    for n in needles: assert n in err[0], err[0]


def test_bad_input_errors(tmp_path, corpus):
    _one_clear_error(run(args(tmp_path / "x", corpus, extra=["train.micro_batch=2"])),
                     "unknown config key train.micro_batch", "did you mean train.micro_batch_size")
    _one_clear_error(run(args(tmp_path / "x", tmp_path / "missing.txt")), "missing.txt", "fix the path")
    _one_clear_error(run(args(tmp_path / "x", corpus, extra=["--resume", "latest"])), "no checkpoint found")
    out = tmp_path / "ok"
    r = run(args(out, corpus, steps=2, ckpt=2)); assert r.returncode == 0, r.stderr[-3000:]
    # wrong shape: another width
    _one_clear_error(run(args(out, corpus, steps=4, ckpt=2, extra=["model.overrides.hidden_size=32", "--resume", "latest"])),
                     "is of another model", "hidden_size=64 (this run: 32)")
    # wrong architecture: MoE instead of dense
    _one_clear_error(run(args(out, corpus, steps=4, ckpt=2, extra=["model.overrides.num_experts=4",
                                                                  "model.overrides.num_experts_per_tok=2", "--resume", "latest"])),
                     "num_experts=0 (this run: 4)")
    # a directory that is not one of ours
    fake = tmp_path / "fake" / "step_000001"; fake.mkdir(parents=True); (fake / "COMPLETE").write_text("{}")
    _one_clear_error(run(args(out, corpus, extra=["--resume", str(fake)])), "not a checkpoint written by this trainer")


def test_config_and_cli_errors_are_one_line(tmp_path, corpus):
    _one_clear_error(run(args(tmp_path / "x", corpus, extra=["optim.lr=abc"])), "optim.lr must be a number, got 'abc'")
    _one_clear_error(run(args(tmp_path / "x", corpus, extra=["train.data_parallel=fsdp"])), "has moved: use distributed.fsdp_enabled")
    _one_clear_error(run(args(tmp_path / "x", corpus, extra=["distributed.tp_size=2"])),
                     "does not divide the world size 1")
    for sub in ("sft", "grpo", "dpo", "eval"):
        r = run(["--config", "x"], cmd=[sys.executable, str(ROOT / "scripts" / "train.py"), sub])
        _one_clear_error(r, f"train.py {sub}` is planned but not built yet")
    r = run(["--show-keys"], cmd=TRAIN[:3]); assert r.returncode == 0 and "pretrain.stages.<name>.yarn_factor" in r.stdout


def test_fresh_run_keeps_an_earlier_runs_checkpoints(tmp_path, corpus):
    out = tmp_path / "run"
    r = run(args(out, corpus, steps=2, ckpt=2)); assert r.returncode == 0, r.stderr[-3000:]
    assert "train.dtype=auto:" in r.stdout                           # the precision it picked, and why
    _one_clear_error(run(args(out, corpus, steps=2, ckpt=2)), "already holds checkpoints", "--resume latest")
    assert (out / "checkpoints" / "step_000002" / "COMPLETE").is_file()


def test_nan_steps_skipped_then_stop(tmp_path, corpus):
    out = tmp_path / "one"
    r = run(args(out, corpus, steps=5, ckpt=5), cmd=faulty("--nan-steps", "3"))
    assert r.returncode == 0, r.stderr[-3000:]
    rec = {x["step"]: x for x in records(out)}
    assert rec[3]["skipped"] and rec[3]["bad_steps"] == 1 and not rec[4]["skipped"] and rec[5]["bad_steps"] == 1
    assert "update skipped" in r.stdout
    out = tmp_path / "many"
    r = run(args(out, corpus, steps=8, ckpt=100, extra=["train.max_bad_steps=3"]), cmd=faulty("--nan-steps", "2,3,4"))
    assert r.returncode == 3, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "3 non-finite losses in a row" in r.stderr and "--resume latest" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000004"]


def test_two_gloo_ranks_save_and_resume_on_one(tmp_path, corpus):
    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
    r = run(args(one, corpus, steps=4, ckpt=2, extra=["train.grad_accum=1", "train.micro_batch_size=4"]))
    assert r.returncode == 0, r.stderr[-3000:]
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(ROOT / "scripts" / "train.py"), "pretrain", "--config", "pretrain_debug", "train.device=cpu"]
    r = run(args(two, corpus, steps=4, ckpt=2, extra=["train.grad_accum=1", "train.micro_batch_size=2"]), cmd=tr)
    assert r.returncode == 0, r.stderr[-5000:]
    ck = json.loads((two / "checkpoints" / "step_000002" / "COMPLETE").read_text())
    assert ck["world_size"] == 2
    # the same global batches (4 windows) on 1 rank x 4 and on 2 ranks x 2: the same losses up to summation order
    l1, l2 = by_step(one), by_step(two)
    for s in range(1, 5): assert abs(l1[s][0] - l2[s][0]) < 1e-4 * l1[s][0], (s, l1[s], l2[s])
    # the 2-rank checkpoint of step 2 resumed on 1 process (DCP reshards; the sampler state is world-size free)
    r = run(args(back, corpus, steps=4, ckpt=2, extra=["train.micro_batch_size=4", "train.grad_accum=1",
                                                     "--resume", str(two / "checkpoints" / "step_000002")]))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "RNG streams are not restored" in r.stderr            # the per-rank RNGs do not carry over; says so
    l3 = by_step(back)
    assert sorted(l3) == [3, 4]
    for s in (3, 4): assert abs(l1[s][0] - l3[s][0]) < 1e-4 * l1[s][0], (s, l1[s], l3[s])


def test_two_gloo_ranks_fsdp_and_export(tmp_path, corpus):
    out = tmp_path / "fsdp"
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(ROOT / "scripts" / "train.py"), "pretrain", "--config", "pretrain_debug", "train.device=cpu"]
    r = run(args(out, corpus, steps=2, ckpt=2, extra=["distributed.fsdp_enabled=true", "train.micro_batch_size=2",
                                                    "train.grad_accum=1", "checkpoint.export_hf=true"]), cmd=tr)
    assert r.returncode == 0, r.stderr[-5000:]
    import torch
    from qwen3_scratch.model.hf import load_hf
    from qwen3_scratch.training.checkpoint import load_checkpoint
    m = load_hf(out / "hf", dtype="float32")                      # the gathered FSDP weights, as a HF checkpoint
    m2 = load_hf(out / "hf", dtype="float32")
    with torch.no_grad():
        for q in m2.parameters(): q.zero_()
    load_checkpoint(out / "checkpoints" / "step_000002", m2, restore_rng=False)   # DCP: 2 shards -> 1 process
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k


def test_dry_run_cli(tmp_path):
    "`pretrain --dry-run` plans 8 ranks as FSDP 2 x TP 2 x PP 2 on one CPU process; without --world-size it says what to pass."
    dry = TRAIN[:5] + ["--dry-run"]                               # options before the key=value overrides
    r = run(["--world-size", "8", "distributed.fsdp_enabled=true", "distributed.tp_size=2", "distributed.pp_size=2",
             "model.overrides.tie_word_embeddings=false", "pretrain.run_stages=[s1]"], cmd=dry)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "8 ranks = pp 2 x dp 2 x tp 2" in r.stdout and "rank 4 (stage 1, layers 3-5)" in r.stdout, r.stdout
    _one_clear_error(run([], cmd=dry), "pass --world-size N")
    _one_clear_error(run(["--world-size", "2", "distributed.pp_size=2"], cmd=dry), "tie_word_embeddings=false")


def test_two_gloo_ranks_pipeline_and_export(tmp_path, corpus):
    "torchrun with pp_size=2: two stages train, validate, checkpoint and export; the checkpoint loads into one process."
    out = tmp_path / "pp"
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
          str(ROOT / "scripts" / "train.py"), "pretrain", "--config", "pretrain_debug", "train.device=cpu"]
    r = run(args(out, corpus, steps=2, ckpt=2, extra=["distributed.pp_size=2", "distributed.pp_microbatches=2",
                                                    "model.overrides.tie_word_embeddings=false",
                                                    "checkpoint.export_hf=true"]), cmd=tr)
    assert r.returncode == 0, r.stderr[-5000:]
    assert "val" in r.stdout, r.stdout
    import torch
    from qwen3_scratch.model.hf import load_hf
    from qwen3_scratch.training.checkpoint import load_checkpoint
    m, m2 = load_hf(out / "hf", dtype="float32"), load_hf(out / "hf", dtype="float32")
    with torch.no_grad():
        for q in m2.parameters(): q.zero_()
    load_checkpoint(out / "checkpoints" / "step_000002", m2, restore_rng=False)   # DCP: 2 pipeline stages -> 1 process
    for (k, a), b in zip(m.state_dict().items(), m2.state_dict().values()): assert torch.equal(a, b), k


def test_moe_logs_aux_loss_and_expert_load(tmp_path, corpus):
    out = tmp_path / "moe"
    moe = ("model.overrides={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2, "
           "head_dim: 16, moe_intermediate_size: 32, kernels: torch}")
    argv = [a for a in args(out, corpus, steps=2, ckpt=2) if not a.startswith("model.overrides")] + ["model.preset=debug_moe", moe]
    r = run(argv); assert r.returncode == 0, r.stderr[-3000:]
    rec = records(out)[-1]
    assert rec["aux_loss"] > 0 and rec["expert_balance"] >= 1 and abs(sum(rec["expert_share"]) - 1) < 1e-6
    assert "aux " in r.stdout


GPU_MODEL = ("model.overrides={hidden_size: 256, num_hidden_layers: 4, num_attention_heads: 4, num_key_value_heads: 2, "
             "head_dim: 64, intermediate_size: 512, kernels: triton}")


def _gpu_count():
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(_gpu_count() < 2, reason="needs 2 CUDA GPUs (NCCL); the gloo tests above cover the logic on CPU")
def test_two_gpus_nccl_ddp_fsdp_resume_on_one(tmp_path, corpus):
    """On 2 GPUs over NCCL, with the Triton kernels and bf16 autocast: DDP and FSDP2 equal one GPU on the same global
    batches, and the FSDP2 checkpoint resumes on one GPU."""
    gpu = [sys.executable, str(ROOT / "scripts" / "train.py"), "pretrain", "--config", "pretrain_debug"]
    tr = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *gpu[1:]]
    def gargs(out, micro, extra=()):
        base = [a for a in args(out, corpus, steps=6, ckpt=3) if not a.startswith("model.overrides")]
        return [*base, GPU_MODEL, "train.grad_accum=1", f"train.micro_batch_size={micro}", *extra]
    one, ddp, fsdp, back = (tmp_path / n for n in ("one", "ddp", "fsdp", "back"))
    r = run(gargs(one, 4), cmd=gpu, env={"CUDA_VISIBLE_DEVICES": "0"}); assert r.returncode == 0, r.stderr[-3000:]
    r = run(gargs(ddp, 2), cmd=tr); assert r.returncode == 0, r.stderr[-5000:]
    r = run(gargs(fsdp, 2, ["distributed.fsdp_enabled=true", "checkpoint.export_hf=true"]), cmd=tr); assert r.returncode == 0, r.stderr[-5000:]
    l1, l2, l3 = by_step(one), by_step(ddp), by_step(fsdp)
    assert sorted(l1) == sorted(l2) == sorted(l3) == list(range(1, 7))
    for s in range(1, 7):
        assert l2[s][1] == l3[s][1], s                              # rank 0 saw the same windows under DDP and FSDP
        for other in (l2, l3): assert abs(l1[s][0] - other[s][0]) < 2e-2 * l1[s][0], (s, l1[s], other[s])
    assert json.loads((fsdp / "checkpoints" / "step_000003" / "COMPLETE").read_text())["world_size"] == 2
    assert (fsdp / "hf" / "config.json").exists()
    # the 2-GPU FSDP checkpoint of step 3 resumed on one GPU (DCP reshards), continuing to step 6
    r = run(gargs(back, 4, ["--resume", str(fsdp / "checkpoints" / "step_000003")]), cmd=gpu,
            env={"CUDA_VISIBLE_DEVICES": "0"})
    assert r.returncode == 0, r.stderr[-3000:]
    lb = by_step(back)
    assert sorted(lb) == [4, 5, 6]
    for s in (4, 5, 6): assert abs(lb[s][0] - l3[s][0]) < 2e-2 * l3[s][0], (s, lb[s], l3[s])
