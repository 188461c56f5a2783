#!/usr/bin/env python
"""Pretraining benchmarks: (a) throughput of a training step, ours vs transformers; (b) learning of the debug model.

    python benchmarks/bench_train.py throughput                    # Qwen3-0.6B shape, B4 x S4096, bf16, fused AdamW
    python benchmarks/bench_train.py learning --data ../shared/data --minutes 5
    python benchmarks/bench_train.py all --data .gpu/data           # both; writes benchmarks/train.md + train_val_loss.png
    python benchmarks/bench_train.py all --smoke --data ../shared/data   # CPU, tiny shapes, < 1 minute: proves the script runs

(a) throughput: one optimizer step = forward + backward of the LM loss on B x S tokens + gradient clipping (1.0) +
fused AdamW step + zero_grad, for: transformers' Qwen3ForCausalLM (SDPA attention) eager and torch.compile'd (whole
model); ours with PyTorch ops + torch.compile per decoder layer; ours with Triton kernels (kernels="triton"), eager and
+ torch.compile per layer. The same weights everywhere (bench_model.build). bf16 weights and optimizer state
(--precision bf16, the usual way such numbers are quoted) or float32 master weights under bf16 autocast
(--precision amp, what scripts/train.py runs). Median over --reps timed steps (CUDA events) after --warmup steps, one
implementation at a time (each with its own copy of the weights and optimizer state); MFU = (6 N + 6 L H D S) FLOPs per token (nbs/34_logger) over the GPU's dense bf16 peak. Then a
torch.profiler table of the top kernels of our fastest variant.
(b) learning: scripts/train.py's Pretrainer on the debug model (Qwen3 vocabulary, 23M parameters), stage s1 only, on the
Shakespeare + Pride and Prejudice texts of --data (a folder holding them anywhere below it, e.g. ../shared/data or a
copy in .gpu/data), for --minutes of training (steps set from a short calibration run, capped at --max-epochs passes
over the text); validation loss curve to benchmarks/train_val_loss.png and the final value to train.md.
"""
import argparse, datetime, gc, os, platform, statistics, sys, tempfile, time, traceback
from pathlib import Path

if "--smoke" in sys.argv: os.environ.setdefault("TRITON_INTERPRET", "1")   # Triton kernels in the CPU interpreter

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_model import build, profile_table, timed  # noqa: E402  (same weights in HF and ours; timing, profiles)
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.transformer import Qwen3Model  # noqa: E402
from qwen3_scratch.training.logger import flops_per_token, peak_flops, read_metrics  # noqa: E402
from qwen3_scratch.training.optimizer import build_optimizer  # noqa: E402

SHAPE_06B = dict(vocab_size=151936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, tie_word_embeddings=True, max_position_embeddings=40960)
SMOKE_SHAPE = dict(vocab_size=2048, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=16, intermediate_size=128, tie_word_embeddings=True, max_position_embeddings=4096)


# ---------------------------------------------------------------- (a) throughput
def _variant(ours: Qwen3Model, cfg: ModelConfig, kernels: str, compile_layers: bool) -> Qwen3Model:
    "Our model on the same weights (cloned: each variant has its own optimizer state) under another kernels setting."
    with torch.device("meta"): m = Qwen3Model(cfg.replace(kernels=kernels))
    m.load_state_dict({k: v.clone() for k, v in ours.state_dict().items()}, assign=True)
    m.rotary_emb.inv_freq = ours.rotary_emb.inv_freq.clone()
    m.rotary_emb.attention_scaling = ours.rotary_emb.attention_scaling
    if compile_layers:
        for layer in m.layers: layer.compile(dynamic=False)  # fixed shapes: no symbolic sizes
    return m.train()


def _clone_hf(hf):
    import copy
    return copy.deepcopy(hf)


def train_step_fn(m, ids, labels, precision: str, device, is_hf: bool):
    "One optimizer step of `m` (forward, backward, clip 1.0, fused AdamW, zero_grad) as a closure."
    if precision == "amp": m.float()
    opt = build_optimizer(m, lr=1e-5, fused=device.type == "cuda")
    amp = precision == "amp"
    def f():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = m(ids, labels=ids).loss if is_hf else m(ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0, foreach=True)
        opt.step(); opt.zero_grad(set_to_none=True)
    return f


def throughput(a) -> list[str]:
    smoke = a.smoke
    cuda = torch.cuda.is_available() and not smoke
    if not cuda and not smoke: sys.exit("throughput mode needs a CUDA GPU (or --smoke on the CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    import transformers
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from qwen3_scratch.model.hf import config_to_hf
    cfg = ModelConfig.from_preset("small", **(SMOKE_SHAPE if smoke else SHAPE_06B), kernels="torch")
    B, S = (1, 64) if smoke else (a.batch, a.seq)
    dtype = torch.bfloat16
    if cuda: hf, ours = build(cfg, dtype)
    else:   # bench_model.build is CUDA-only; the same construction on the CPU
        hf_kw = {k: v for k, v in config_to_hf(cfg).items() if k not in ("architectures", "model_type")}
        torch.manual_seed(0)
        hf = Qwen3ForCausalLM(Qwen3Config(**hf_kw, attn_implementation="sdpa")).to(dtype)
        with torch.device("meta"): ours = Qwen3Model(cfg)
        sd = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}; sd.pop("lm_head.weight", None)
        ours.load_state_dict(sd, assign=True); ours.rotary_emb.inv_freq = torch.empty(cfg.head_dim // 2); ours.rotary_emb.reset_parameters()
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, min(cfg.vocab_size, 151_643), (B, S), device=device, generator=g)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)

    variants = {"transformers (sdpa), eager": lambda: (_clone_hf(hf), True)}
    if not smoke: variants["transformers (sdpa), torch.compile"] = lambda: (torch.compile(_clone_hf(hf)), True)
    variants["ours, PyTorch ops + torch.compile per layer"] = lambda: (_variant(ours, cfg, "torch", not smoke), False)
    variants["ours, Triton kernels"] = lambda: (_variant(ours, cfg, "triton", False), False)
    if not smoke: variants["ours, Triton kernels + torch.compile per layer"] = lambda: (_variant(ours, cfg, "triton", True), False)
    prof_name = a.profile or ("ours, Triton kernels" if smoke else "ours, Triton kernels + torch.compile per layer")
    # one variant at a time (its own weights copy and AdamW state), freed before the next: 0.6B x 5 would not fit in amp
    times, mem, errors, prof = {}, {}, {}, None
    tm = timed
    reps = 1 if smoke else a.reps
    for name, make in variants.items():
        m = fn = None
        try:
            gc.collect()
            if cuda: torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
            m, is_hf = make()
            fn = train_step_fn(m, ids, labels, a.precision, device, is_hf)
            times[name] = tm(fn, warmup=(1 if smoke else a.warmup), reps=reps)
            mem[name] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
            print(f"{name}: median {statistics.median(times[name]):.1f} ms", flush=True)
            if name == prof_name:
                try: prof = profile_table(fn, steps=1 if smoke else 3)
                except Exception as e: prof = [f"profiler failed: {type(e).__name__}: {e}"]
        except Exception as e:   # a variant that does not build or run is reported, not fatal
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"; traceback.print_exc()
        del m, fn
    peak = peak_flops(device)
    fpt = flops_per_token(cfg, S)
    ntok = B * S
    gpu = torch.cuda.get_device_name() if cuda else f"CPU ({platform.processor() or 'unknown'}), smoke"
    lines = ["## (a) Throughput: one training step, Qwen3-0.6B shape" if not smoke else "## (a) Throughput (smoke: tiny shape on the CPU)", "",
             f"- device: {gpu}; date: {datetime.date.today()}; torch {torch.__version__}; transformers {transformers.__version__}",
             f"- command: `python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`",
             f"- model: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads}/{cfg.num_key_value_heads} heads "
             f"of {cfg.head_dim}, intermediate {cfg.intermediate_size}, vocab {cfg.vocab_size}, tied; {cfg.total_params_estimate() / 1e6:.0f}M "
             f"parameters; B{B} x S{S}; precision {a.precision} ({'bf16 weights and AdamW state' if a.precision == 'bf16' else 'float32 master weights, bf16 autocast'})",
             f"- step = forward + backward + clip_grad_norm(1.0) + fused AdamW + zero_grad; median of {reps} steps after "
             f"{1 if smoke else a.warmup} warm-up steps (torch.compile's compilation happens in the warm-up); "
             f"{fpt / 1e9:.2f} GFLOP per token (6 N + 6 L H D S)", "",
             "| implementation | median ms | tokens/s | vs transformers eager | MFU | peak GiB |", "|---|---:|---:|---:|---:|---:|"]
    base_name = "transformers (sdpa), eager"
    base = statistics.median(times[base_name]) if base_name in times else None
    for name in variants:
        if name in errors: lines.append(f"| {name} | failed: {errors[name]} | | | | |"); continue
        ms = statistics.median(times[name]); tps = ntok / ms * 1e3
        mf = f"{tps * fpt / peak:.1%}" if peak else "n/a"
        ratio = f"{base / ms:.2f}x" if base else ""
        gib = f"{mem[name]:.1f}" if mem[name] is not None else ""
        lines.append(f"| {name} | {ms:.1f} | {tps:,.0f} | {ratio} | {mf} | {gib} |")
    if prof:
        lines += ["", f"### Where the time goes: {prof_name} (torch.profiler: GPU kernels on a GPU, CPU ops on the CPU)", ""] + prof
    return lines


# ---------------------------------------------------------------- (b) learning
def _find_texts(data: Path) -> dict:
    want = {"shakespeare": "tinyshakespeare.txt", "gutenberg": "pride_and_prejudice.txt"}
    found = {}
    for k, fn in want.items():
        hits = sorted(data.rglob(fn)) if data.is_dir() else []
        if hits: found[k] = str(hits[0])
    if not found: sys.exit(f"no {' or '.join(want.values())} under {data}: pass --data pointing at ../shared/data or a copy of its pretrain/ files")
    return found


def learning(a, work: Path) -> list[str]:
    from qwen3_scratch.training.config import load_train_config
    from qwen3_scratch.training.pretrain import Pretrainer
    from qwen3_scratch.training.logger import plot_loss_curve
    texts = _find_texts(Path(a.data))
    mix = {p: 0.5 for p in texts.values()}
    TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "intermediate_size": 128, "kernels": "torch"}
    seq, mbs = (64, 4) if a.smoke else (a.learn_seq, a.learn_batch)
    def conf(out, steps, minutes=None):
        over = {"out_dir": str(out), "model": {"preset": "debug", **({"overrides": TINY} if a.smoke else {})},
                "data": {"source": "local", "cache_dir": str(work / "cache"), "val_fraction": 0.01},
                "optim": {"lr": a.lr}, "schedule": {"warmup_steps": max(1, min(100, steps // 20)), "min_lr_ratio": 0.1},
                "train": {"micro_batch_size": mbs, "grad_accum": 1, "val_every": max(1, steps // 25),
                          "val_batches": 8 if not a.smoke else 2, "time_limit_min": minutes, "compile": False},
                "checkpoint": {"every": 10**9, "export_hf": False},
                "log": {"every": max(1, steps // 20), "progress": False, "tensorboard": False, "plot": False},
                "pretrain": {"run_stages": ["s1"], "stages": {"s1": {"seq_len": seq, "steps": steps, "local_mixture": mix, "rope_theta": 1e6}}}}
        return load_train_config("pretrain_debug", over)
    # calibration: a few steps to time one, then as many as fit the budget (capped at --max-epochs passes)
    cal = Pretrainer(conf(work / "calib", 6))
    t0 = time.perf_counter(); cal.run(); t_cal = time.perf_counter() - t0
    recs = read_metrics(work / "calib" / "metrics.jsonl")
    step_s = statistics.median(r["step_time"] for r in recs[2:]) if len(recs) > 3 else recs[-1]["step_time"]
    n_windows = len(cal.data["train"])
    budget_s = a.minutes * 60
    steps = max(10, int(0.85 * budget_s / (step_s * 1.1)))   # 10% for validation
    steps = min(steps, max(10, int(a.max_epochs * n_windows / mbs)))
    print(f"calibration: {step_s * 1e3:.1f} ms/step ({t_cal:.0f} s with data preparation); {n_windows} windows per epoch; "
          f"training {steps} steps", flush=True)
    out = work / "learn"
    t0 = time.perf_counter()
    res = Pretrainer(conf(out, steps, minutes=a.minutes)).run()
    wall = time.perf_counter() - t0
    recs = read_metrics(out / "metrics.jsonl")
    png = (a.out_dir / "train_val_loss_smoke.png") if a.smoke else ROOT / "benchmarks" / "train_val_loss.png"
    plot_loss_curve(recs, png, f"debug model on Shakespeare + Pride and Prejudice ({'smoke' if a.smoke else f'{a.minutes:g} min'})")
    vals = [(r["step"], r["val_loss"]) for r in recs if "val_loss" in r]
    tps = statistics.median(r["tokens_per_sec"] for r in recs[1:]) if len(recs) > 1 else float("nan")
    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    lines = ["## (b) Learning: the debug model on Shakespeare + Pride and Prejudice" + (" (smoke)" if a.smoke else ""), "",
             f"- device: {dev}; date: {datetime.date.today()}; command: `python benchmarks/bench_train.py {' '.join(sys.argv[1:])}`",
             f"- model: `debug` ({'tiny overrides, ' if a.smoke else ''}Qwen3 vocabulary), stage s1, windows of {seq} tokens, batch {mbs}, "
             f"AdamW lr {a.lr:g} cosine to 0.1x, bf16 autocast; data: {', '.join(Path(p).name for p in texts.values())} "
             f"(50/50 mixture, last 1% of each held out)",
             f"- {res['step']} steps ({'stopped by the time limit' if res.get('stopped_early') else 'all planned'}), "
             f"{res['tokens_seen']:,} tokens ({res['tokens_seen'] / max(1, n_windows * seq):.1f} epochs), {wall / 60:.1f} min "
             f"wall (training + validation), median {tps:,.0f} tokens/s",
             f"- **final validation loss: {res['val_loss']:.4f}** nats/token (first: {vals[0][1]:.3f} at step {vals[0][0]}; "
             f"best: {min(v for _, v in vals):.4f}); curve: [`{png.name}`]({png.name})", "",
             "| step | validation loss |", "|---:|---:|"] + [f"| {s} | {v:.4f} |" for s, v in vals]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("mode", choices=["throughput", "learning", "all"])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU, < 1 minute")
    p.add_argument("--precision", choices=["bf16", "amp"], default="bf16")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile", default=None, help="the implementation row to profile (default: ours, Triton kernels + torch.compile per layer)")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder with tinyshakespeare.txt / pride_and_prejudice.txt")
    p.add_argument("--minutes", type=float, default=5.0, help="learning mode's training budget")
    p.add_argument("--max-epochs", type=float, default=10.0, help="learning mode: at most this many passes over the text")
    p.add_argument("--learn-seq", type=int, default=512)
    p.add_argument("--learn-batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--out", default=None, help="markdown output (default benchmarks/train.md; --smoke: a temporary folder)")
    a = p.parse_args()
    if a.smoke: a.minutes = min(a.minutes, 0.15)
    a.out_dir = Path(tempfile.gettempdir()) / "qwen3_bench_train_smoke" if a.smoke else ROOT / "benchmarks"
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out = Path(a.out or a.out_dir / ("train_smoke.md" if a.smoke else "train.md"))
    # one mode rewrites its own section of an existing file and keeps the other (the two may run as separate commands)
    old = out.read_text() if out.is_file() else ""
    sec = {k: old[old.index(h):(old.index("## (b)") if k == "a" and "## (b)" in old else len(old))].rstrip() + "\n"
           for k, h in (("a", "## (a)"), ("b", "## (b)")) if h in old}
    if a.mode in ("throughput", "all"):
        sec["a"] = "\n".join(throughput(a)) + "\n"
        if a.mode == "all" and torch.cuda.is_available(): gc.collect(); torch.cuda.empty_cache()
    if a.mode in ("learning", "all"):
        with tempfile.TemporaryDirectory() as d: sec["b"] = "\n".join(learning(a, Path(d))) + "\n"
    text = "\n".join(["# Pretraining benchmarks", "", *[sec[k] for k in ("a", "b") if k in sec]])
    print(text)
    out.parent.mkdir(parents=True, exist_ok=True); out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
