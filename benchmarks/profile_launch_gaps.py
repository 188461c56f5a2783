#!/usr/bin/env python
"""A launch-gap timeline of one MoE training step on one GPU: eager, and with each decoder layer replayed as CUDA graphs.

    python benchmarks/profile_launch_gaps.py --out benchmarks/launch_gaps.json
    python benchmarks/profile_launch_gaps.py --layers 4 --out /tmp/launch_gaps.json     # a quicker, smaller run

The model is benchmarks/bench_moe.py's (64 experts top-8, d=1024, moe_intermediate 384, 16/8 heads of 128, vocab
151936, B4 x S2048, bf16 weights, our Triton kernels), with random weights. A step is one forward and backward of
the LM loss (the embedding, final norm and loss stay eager in both modes). For each mode the script warms up, times
--reps steps with CUDA events (no profiler: the step time the notebook's titles give), then profiles --steps more
with torch.profiler (CPU and CUDA activity), each step closed by a synchronize, and keeps the median one: every GPU
kernel, memcpy and memset that started inside it. The profiler adds host work to every launch, so the profiled
eager step is slower than the timed one; the idle share is that of the profiled step.

The JSON it writes is small: per mode the timed step, the profiled step's span (its first kernel's start to its
last kernel's end), the kernels' summed and merged (union) time, the share of the span the GPU was idle, the number
of kernels, and the first --show kernels as [start_us, duration_us, name] from the step's first kernel, one a line
(the same work in the same order in both modes; a replay adds a few copies into its graph's inputs).
nbs/27_cuda_graphs draws it ("Why a layer can be launch-bound").
"""
import argparse
import datetime
import gc
import json
import os
import re
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen3_scratch.model.config import ModelConfig  # noqa: E402
from qwen3_scratch.model.transformer import Qwen3Model  # noqa: E402

STEP = "launch_gaps_step_"                       # the record_function name of each profiled step
GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}  # what a chrome trace calls GPU activity


def moe_config(a) -> ModelConfig:
    "bench_moe.py's MoE shape: 64 experts top-8, d=1024, moe_intermediate 384, 16 query / 8 KV heads of 128."
    return ModelConfig.from_preset("debug_moe").replace(
        hidden_size=1024, num_hidden_layers=a.layers, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        num_experts=64, num_experts_per_tok=8, moe_intermediate_size=384, intermediate_size=3072,
        max_position_embeddings=max(4096, a.seq), kernels=a.kernels)


def build(cfg: ModelConfig) -> Qwen3Model:
    "The model in bf16 on the GPU, initialised there; the rotary frequencies kept in float32."
    with torch.device("cuda"): m = Qwen3Model(cfg)
    m = m.to(torch.bfloat16).train()
    m.rotary_emb.inv_freq = torch.empty(cfg.head_dim // 2, device="cuda")
    m.rotary_emb.reset_parameters()
    return m


def timed_ms(step, reps: int) -> float:
    "Median milliseconds of one `step()`, each timed alone with CUDA events."
    out = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); step(); b.record(); torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def trace_events(step, steps: int) -> list:
    "The chrome-trace events of `steps` profiled calls of `step`, each inside a record_function and synchronized."
    from torch.profiler import ProfilerActivity, profile, record_function
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(steps):
            with record_function(f"{STEP}{i}"):
                step()
                torch.cuda.synchronize()  # every kernel of the step ends inside its range
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        return json.loads(Path(path).read_text())["traceEvents"]


def step_kernels(events: list) -> list:
    "Per profiled step, its GPU activity `(start_us, duration_us, name)` sorted by start: what started inside its range."
    def spans(keep):
        return sorted((float(e["ts"]), float(e.get("dur", 0.0)), str(e.get("name", ""))) for e in events
                      if e.get("ph") == "X" and "ts" in e and keep(e))
    steps = spans(lambda e: e.get("cat") == "user_annotation" and str(e.get("name", "")).startswith(STEP))
    gpu = spans(lambda e: str(e.get("cat", "")).lower() in GPU_CATS)
    if not steps: raise RuntimeError(f"the trace has no {STEP}* ranges: torch.profiler did not record the steps")
    if not gpu: raise RuntimeError("the trace has no GPU kernels: torch.profiler's CUDA activity (CUPTI) is not "
                                   "working here; check that the CUDA toolkit's CUPTI library can be loaded")
    return [[k for k in gpu if t0 <= k[0] < t0 + dur] for t0, dur, _ in steps]


def step_stats(kernels: list, show: int) -> dict:
    "The step's span, summed and merged kernel time, idle share, and its first `show` kernels from its first start."
    t0 = kernels[0][0]
    span = max(s + d for s, d, _ in kernels) - t0
    busy, end = 0.0, t0                               # the union of the intervals: overlapping kernels count once
    for s, d, _ in kernels:
        if s + d > end: busy += s + d - max(s, end); end = s + d
    return {"profiled_step_ms": round(span / 1e3, 3), "kernel_ms": round(sum(d for _, d, _ in kernels) / 1e3, 3),
            "busy_ms": round(busy / 1e3, 3), "idle_share": round(1 - busy / span, 4) if span > 0 else 0.0,
            "n_kernels": len(kernels),
            "intervals": [[round(s - t0, 2), round(d, 2), n[:60]] for s, d, n in kernels[:show]]}


def measure(step, a) -> dict:
    "Warm up, time, profile: the stats of the median profiled step, and the timed step in ms."
    for _ in range(a.warmup): step()
    ms = timed_ms(step, a.reps)
    steps = [k for k in step_kernels(trace_events(step, a.steps)) if k]
    if not steps: raise RuntimeError("no GPU kernel started inside a profiled step: the trace's clocks disagree")
    med = sorted(steps, key=lambda k: max(s + d for s, d, _ in k) - k[0][0])[len(steps) // 2]
    return {"step_ms": round(ms, 3), **step_stats(med, a.show)}


def dumps(out: dict) -> str:
    "`out` as indented JSON with each interval on one line: small, and readable in a diff."
    text = json.dumps(out, indent=1)
    return re.sub(r'\[\s+(-?[\d.e+-]+),\s+(-?[\d.e+-]+),\s+("(?:[^"\\]|\\.)*")\s+\]', r"[\1, \2, \3]", text) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="benchmarks/launch_gaps.json", help="the JSON to write")
    p.add_argument("--layers", type=int, default=12, help="decoder layers (bench_moe.py's model has 12)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--kernels", default="triton", choices=["triton", "torch", "auto"])
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton autotuning)")
    p.add_argument("--reps", type=int, default=10, help="steps timed with CUDA events")
    p.add_argument("--steps", type=int, default=3, help="steps profiled; the median one is kept")
    p.add_argument("--show", type=int, default=200, help="kernels kept per mode for the picture (at most 400)")
    a = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("profile_launch_gaps.py needs a CUDA GPU and torch.cuda.is_available() is False: run it on a GPU "
                 "machine (it profiles GPU kernels; there is nothing to measure on a CPU)")
    if not 1 <= a.show <= 400: sys.exit(f"--show {a.show}: keep 1..400 kernels per mode (the JSON stays small)")
    if min(a.reps, a.steps) < 1: sys.exit("--reps and --steps must be >= 1")
    from qwen3_scratch.training.cuda_graphs import cuda_graph_layers
    cfg = moe_config(a)
    torch.manual_seed(0)
    m = build(cfg)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device="cuda", generator=g)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)  # pre-shifted, as the model takes them

    def step():
        m(ids, labels=labels).loss.backward()
        for q in m.parameters(): q.grad = None
    modes = {"eager": measure(step, a)}
    print(f"eager: {modes['eager']['step_ms']:.1f} ms a step, GPU idle {modes['eager']['idle_share']:.0%}", flush=True)
    gc.collect(); torch.cuda.empty_cache()
    graphs = cuda_graph_layers(m, a.batch, a.seq)
    modes["CUDA graphs per layer"] = measure(step, a)
    if graphs.eager or not graphs.replayed:
        raise RuntimeError(f"the graphed steps did not replay ({graphs.replayed} replays, {graphs.eager} eager calls)")
    gm = modes["CUDA graphs per layer"]
    print(f"CUDA graphs per layer: {gm['step_ms']:.1f} ms a step, GPU idle {gm['idle_share']:.0%}", flush=True)
    out = {"gpu": torch.cuda.get_device_name(), "date": str(datetime.date.today()), "torch": torch.__version__,
           "command": f"python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".rstrip(),
           "model": f"{cfg.num_hidden_layers}-layer MoE, d{cfg.hidden_size}, E{cfg.num_experts} top-{cfg.num_experts_per_tok}, "
                    f"B{a.batch} x S{a.seq}, bf16, kernels={cfg.kernels}: one training step",
           "step": "forward + backward of the LM loss; embedding, final norm and loss eager in both modes",
           "shown": f"its first {a.show} GPU kernels", "modes": modes}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(dumps(out))
    print(f"wrote {a.out} ({Path(a.out).stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
