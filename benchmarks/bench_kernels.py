#!/usr/bin/env python
"""The six Triton kernels against eager PyTorch, torch.compile, SDPA and Liger-Kernel, side by side in one run.

    python benchmarks/bench_kernels.py                      # all kernels, writes benchmarks/kernels.md
    python benchmarks/bench_kernels.py --only attention rmsnorm --out /tmp/k.md

Each implementation is timed two ways, medians of --reps timings in each of --rounds rounds that interleave the
implementations; bf16 inputs:
  graph     --inner calls captured in one CUDA graph and replayed between CUDA events (time / inner): the GPU time
            of the kernels with no host launch or autograd overhead. This is the column throughput is computed from.
  per call  one call between CUDA events, synchronised: what an eager caller pays, host overhead included.
An implementation that cannot be captured (a host sync inside) is timed per call only, and the table says so.
The run first measures its ceilings: device-to-device copy bandwidth (bytes read + written) and an 8192^3 bf16
matmul. Memory-bound kernels report GB/s of the fewest bytes they must move (each input read once, each output
written once) and % of the copy bandwidth; attention reports TFLOP/s (causal: half the full-matrix FLOPs; backward
2.5x forward). Liger-Kernel rows appear when it is importable.
"""
import argparse
import datetime
import gc
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import liger_kernel  # noqa: F401
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    from liger_kernel.ops.rope import LigerRopeFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    HAVE_LIGER = True
except Exception as e:  # noqa: BLE001
    print(f"Liger-Kernel not importable ({e}); its rows are left out")
    HAVE_LIGER = False


def median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def graph_ms(fn, reps: int, inner: int) -> float:
    "Median ms of one call of fn, from CUDA-graph replays of `inner` captured calls (no host overhead)."
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up (autotuning, compilation, allocator) outside the capture
        for _ in range(3): fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner): fn()
    graph.replay(); torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); graph.replay(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / inner)
    del graph
    return statistics.median(ts)


def run_rounds(impls: dict, reps: int, rounds: int, inner: int = 10) -> dict:
    "{impl: (graph ms or None, per-call ms)}: medians over interleaved rounds."
    times = {k: ([], []) for k in impls}
    no_graph = set()
    for _ in range(rounds):
        for k, fn in impls.items():
            gc.collect(); torch.cuda.synchronize()
            times[k][1].append(median_ms(fn, reps))
            if k in no_graph or inner < 1: continue
            try: times[k][0].append(graph_ms(fn, reps, inner))
            except Exception as e:  # noqa: BLE001 (a host sync inside fn makes capture fail: per-call timing only)
                print(f"{k}: not capturable in a CUDA graph ({str(e).splitlines()[0][:100]}); per-call timing only")
                no_graph.add(k); torch.cuda.synchronize()
    return {k: (statistics.median(g) if g and k not in no_graph else None, statistics.median(c))
            for k, (g, c) in times.items()}


def rows_for(bench: str, t: dict, rate=None) -> list[tuple]:
    "Table rows (bench, impl, ms, per-call ms, graph-timed?, throughput, of ceiling); ms = graph time when captured."
    out = []
    for k, (g_ms, call_ms) in t.items():
        ms = g_ms if g_ms is not None else call_ms
        out.append((bench, k, ms, call_ms, g_ms is not None, *(rate(ms) if rate else ("", ""))))
    return out


def bw_rate(nbytes: int, bw: float):
    return lambda ms: (f"{nbytes / ms / 1e6:,.0f} GB/s", f"{nbytes / ms / 1e6 / bw:.0%}")


def ceilings():
    n = 1 << 30  # 2 GiB of bf16
    src, dst = torch.randn(n, device="cuda", dtype=torch.bfloat16), torch.empty(n, device="cuda", dtype=torch.bfloat16)
    ms = statistics.median(median_ms(lambda: dst.copy_(src), 20) for _ in range(3))
    bw = 2 * n * 2 / ms / 1e6  # GB/s, read + write
    del src, dst
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = statistics.median(median_ms(lambda: a @ b, 20) for _ in range(3))
    return bw, 2 * 8192**3 / ms / 1e9  # GB/s, TFLOP/s


def fwd_bwd(f, inputs, grad_out):
    "A closure running f(*inputs) and its backward with grad_out (tuple outputs: grads for each)."
    def run():
        for t in inputs:
            if isinstance(t, torch.Tensor) and t.requires_grad: t.grad = None
        out = f(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        torch.autograd.backward([o for o in outs if o.requires_grad], grad_out[: len(outs)])
    return run


def rand(*shape, g, scale=1.0, rg=False, dtype=torch.bfloat16):
    t = (torch.randn(*shape, device="cuda", generator=g) * scale).to(dtype)
    return t.requires_grad_(rg)


# ---------------------------------------------------------------- kernels
def bench_rmsnorm(a, g, bw):
    from qwen3_scratch.kernels.rmsnorm import rms_norm
    from qwen3_scratch.model.norm import rms_norm as ref
    M, N = 16384, 2048
    x, w, dy = rand(M, N, g=g, rg=True), rand(N, g=g, scale=0.1, rg=True) + 1, rand(M, N, g=g)
    w = w.detach().requires_grad_()
    impls = {"eager": fwd_bwd(lambda x, w: ref(x, w, 1e-6), (x, w), (dy,)),
             "torch.compile": fwd_bwd(torch.compile(lambda x, w: ref(x, w, 1e-6)), (x, w), (dy,)),
             "ours (Triton)": fwd_bwd(lambda x, w: rms_norm(x, w, 1e-6), (x, w), (dy,))}
    if HAVE_LIGER: impls["Liger-Kernel"] = fwd_bwd(lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6), (x, w), (dy.clone(),))
    nbytes = (2 + 3) * M * N * 2  # fwd: x, y; bwd: dy, x, dx
    return rows_for(f"rms_norm fwd+bwd {M}x{N}", run_rounds(impls, a.reps, a.rounds, a.inner), bw_rate(nbytes, bw))


def bench_swiglu(a, g, bw):
    from qwen3_scratch.kernels.swiglu import swiglu
    from qwen3_scratch.model.ffn import swiglu as ref
    M, N = 16384, 6144
    gate, up, dy = rand(M, N, g=g, rg=True), rand(M, N, g=g, rg=True), rand(M, N, g=g)
    impls = {"eager": fwd_bwd(ref, (gate, up), (dy,)), "torch.compile": fwd_bwd(torch.compile(ref), (gate, up), (dy,)),
             "ours (Triton)": fwd_bwd(swiglu, (gate, up), (dy,))}
    if HAVE_LIGER: impls["Liger-Kernel"] = fwd_bwd(LigerSiLUMulFunction.apply, (gate, up), (dy,))
    nbytes = (3 + 5) * M * N * 2  # fwd: gate, up, out; bwd: dy, gate, up, dgate, dup
    return rows_for(f"swiglu fwd+bwd {M}x{N}", run_rounds(impls, a.reps, a.rounds, a.inner), bw_rate(nbytes, bw))


def bench_rope(a, g, bw):
    from qwen3_scratch.kernels.rope import apply_rope
    from qwen3_scratch.model.config import ModelConfig
    from qwen3_scratch.model.rope import RotaryEmbedding, apply_rotary_pos_emb
    B, T, Hq, Hkv, D = 2, 4096, 32, 8, 128  # Qwen3-8B heads
    rope = RotaryEmbedding(ModelConfig.from_preset("medium")).cuda()
    cos, sin = rope(torch.arange(T, device="cuda")[None].expand(B, T), torch.bfloat16)
    # q, k as the model makes them: (B, T, H, D) projections viewed as (B, H, T, D)
    q = rand(B, T, Hq, D, g=g).transpose(1, 2).detach().requires_grad_()
    k = rand(B, T, Hkv, D, g=g).transpose(1, 2).detach().requires_grad_()
    dq, dk = rand(B, Hq, T, D, g=g), rand(B, Hkv, T, D, g=g)
    impls = {"eager": fwd_bwd(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin), (q, k), (dq, dk)),
             "torch.compile": fwd_bwd(torch.compile(lambda q, k: apply_rotary_pos_emb(q, k, cos, sin)), (q, k), (dq, dk)),
             "ours (Triton)": fwd_bwd(lambda q, k: apply_rope(q, k, cos, sin), (q, k), (dq, dk))}
    if HAVE_LIGER: impls["Liger-Kernel"] = fwd_bwd(lambda q, k: LigerRopeFunction.apply(q, k, cos, sin), (q, k), (dq, dk))
    qk = B * T * (Hq + Hkv) * D * 2
    nbytes = 2 * (2 * qk) + 2 * 2 * B * T * D * 2  # fwd+bwd: read q,k write out; cos/sin read in each
    return rows_for(f"apply_rope fwd+bwd B{B} T{T} H{Hq}/{Hkv} D{D}", run_rounds(impls, a.reps, a.rounds, a.inner),
                    bw_rate(nbytes, bw))


def bench_attention(a, g, tflops_mm):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from qwen3_scratch.kernels.flash_attn import flash_attention
    rows = []
    for B, Hq, Hkv, S, D in [(4, 16, 16, 4096, 128), (4, 16, 16, 4096, 64), (4, 16, 4, 4096, 128)]:
        q = rand(B, Hq, S, D, g=g, rg=True)
        k, v = rand(B, Hkv, S, D, g=g, rg=True), rand(B, Hkv, S, D, g=g, rg=True)
        do = rand(B, Hq, S, D, g=g)
        gqa = Hq != Hkv
        fl = 4 * B * Hq * S * S * D / 2  # causal forward
        def sdpa(backend):
            def f(q, k, v):
                with sdpa_kernel(backend): return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            return f
        fwd = {"SDPA flash": sdpa(SDPBackend.FLASH_ATTENTION), "SDPA cuDNN": sdpa(SDPBackend.CUDNN_ATTENTION),
               "ours (Triton)": lambda q, k, v: flash_attention(q, k, v, causal=True)[0]}
        name = f"flash_attention B{B} H{Hq}/{Hkv} S{S} D{D} causal"
        for label, f in list(fwd.items()):
            try: f(q, k, v)
            except Exception as e:  # noqa: BLE001 (a backend may not support a shape)
                print(f"{label} unavailable for {name}: {str(e).splitlines()[0][:120]}"); fwd.pop(label)
        with torch.no_grad():
            t_f = run_rounds({k_: (lambda f=f: f(q, k, v)) for k_, f in fwd.items()}, a.reps, a.rounds, a.inner)
        t_fb = run_rounds({k_: fwd_bwd(f, (q, k, v), (do,)) for k_, f in fwd.items()}, a.reps, a.rounds, a.inner)
        flop_rate = lambda n: lambda ms: (f"{n / ms / 1e9:.0f} TFLOP/s", f"{n / ms / 1e9 / tflops_mm:.0%}")
        rows += rows_for(name + " fwd", t_f, flop_rate(fl)) + rows_for(name + " fwd+bwd", t_fb, flop_rate(3.5 * fl))
        del q, k, v, do
    return rows


def bench_flce(a, g, bw):
    from qwen3_scratch.kernels.cross_entropy import fused_linear_cross_entropy
    T, H, V = 8192, 2048, 151_936
    h = rand(T, H, g=g, rg=True)
    w = rand(V, H, g=g, scale=0.02, rg=True)
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    y[::17] = -100
    one = torch.ones((), device="cuda")
    def eager(h, w): return F.cross_entropy((h @ w.T).float(), y, ignore_index=-100)
    impls = {"eager": fwd_bwd(eager, (h, w), (one,)),
             "ours (Triton)": fwd_bwd(lambda h, w: fused_linear_cross_entropy(h, w, y, ignore_index=-100), (h, w), (one,))}
    if HAVE_LIGER:
        impls["Liger-Kernel"] = fwd_bwd(lambda h, w: LigerFusedLinearCrossEntropyFunction.apply(h, w, y)[0], (h, w), (one,))
    t = run_rounds(impls, a.reps, a.rounds, a.inner)
    rows = []
    for k_, fn in impls.items():  # extra memory: peak during one step beyond what the inputs and grads hold
        fn(); torch.cuda.synchronize(); gc.collect()
        base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()
        fn(); torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**30
        rows += rows_for(f"fused linear CE fwd+bwd T{T} H{H} V{V}", {k_: t[k_]}, lambda ms: (f"{extra:.2f} GiB extra", ""))
    return rows


def bench_moe(a, g, bw):
    from qwen3_scratch.kernels.moe_dispatch import moe_combine, moe_dispatch
    from qwen3_scratch.model.moe import moe_combine_ref, moe_dispatch_ref
    T, K, H, E = 8192, 8, 1024, 64
    x = rand(T, H, g=g, rg=True)
    idx = torch.stack([torch.randperm(E, device="cuda", generator=g)[:K] for _ in range(T)])
    wts = torch.rand(T, K, device="cuda", generator=g).softmax(-1).requires_grad_()
    dout = rand(T, H, g=g)
    def round_trip(dispatch, combine):
        def f(x, wts):
            xs, pos, counts, offsets = dispatch(x, idx, E, check=False)  # ids come from topk: no host-side check
            return combine(xs * 1.0, pos, wts)  # the experts would sit between the two
        return f
    impls = {"torch index ops": fwd_bwd(round_trip(moe_dispatch_ref, moe_combine_ref), (x, wts), (dout,)),
             "ours (Triton)": fwd_bwd(round_trip(moe_dispatch, moe_combine), (x, wts), (dout,))}
    t = run_rounds(impls, a.reps, a.rounds, a.inner)
    # dispatch: read T·H, write T·K·H; combine: read T·K·H, write T·H; backward the same again (+ the xs*1.0 pass)
    nbytes = 2 * 2 * (T * H + T * K * H) * 2
    return rows_for(f"moe dispatch+combine fwd+bwd T{T} k{K} H{H} E{E}", t, bw_rate(nbytes, bw))


BENCHES = {"attention": bench_attention, "rmsnorm": bench_rmsnorm, "swiglu": bench_swiglu, "rope": bench_rope,
           "flce": bench_flce, "moe": bench_moe}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", nargs="*", choices=list(BENCHES), default=list(BENCHES))
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inner", type=int, default=10, help="calls captured per CUDA graph (0: per-call timing only)")
    p.add_argument("--out", default="benchmarks/kernels.md")
    a = p.parse_args()
    if not torch.cuda.is_available(): sys.exit("bench_kernels.py needs a CUDA GPU")
    import triton
    g = torch.Generator(device="cuda").manual_seed(0)
    bw, tf = ceilings()
    print(f"ceilings: copy {bw:,.0f} GB/s, bf16 matmul {tf:.0f} TFLOP/s", flush=True)
    rows = []
    for name in a.only:
        arg = tf if name == "attention" else bw
        try: rows += BENCHES[name](a, g, arg)
        except Exception as e:  # noqa: BLE001 (one failing kernel must not hide the others' numbers)
            import traceback; traceback.print_exc()
            rows.append((name, "FAILED", float("nan"), float("nan"), False, str(e).splitlines()[0][:80], ""))
        print(f"{name} done", flush=True)
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name()
    lines = ["# Triton kernels: ours vs the references", "",
             f"- GPU: {gpu}; date: {datetime.date.today()}; torch {torch.__version__}; triton {triton.__version__}"
             + (f"; Liger-Kernel {liger_kernel.__version__ if hasattr(liger_kernel, '__version__') else 'installed'}" if HAVE_LIGER else "; Liger-Kernel absent"),
             f"- command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip(),
             f"- measured ceilings: device-to-device copy {bw:,.0f} GB/s (read + write); bf16 matmul 8192³ {tf:.0f} TFLOP/s",
             f"- bf16; median over {a.rounds} interleaved rounds of the median of {a.reps} timings; `ms` = GPU time per call from "
             f"CUDA-graph replays of {a.inner} captured calls (no host overhead; `*`: not capturable, timed per call); "
             "`per call ms` = one synchronised eager call, host launch and autograd overhead included; "
             "throughput, ceiling and `vs best other` (= the fastest other implementation's ms / ours; > 1: ours faster) use `ms`", "",
             "| benchmark | implementation | ms | per call ms | throughput | of ceiling | vs best other |",
             "|---|---|---:|---:|---:|---:|---:|"]
    by_bench = {}
    for r in rows: by_bench.setdefault(r[0], []).append(r)
    for bench, rs in by_bench.items():
        col = 2 if all(r[4] for r in rs) else 3  # compare graph times only when every row has one
        others = [r[col] for r in rs if not r[1].startswith("ours")]
        best = min(others) if others else float("nan")
        for r in rs:
            ratio = f"{best / r[col]:.2f}x" if r[1].startswith("ours") and others else ""
            if ratio and col == 3: ratio += " (per call)"
            lines.append(f"| {bench} | {r[1]} | {r[2]:.3f}{'' if r[4] else '*'} | {r[3]:.3f} | {r[5]} | {r[6]} | {ratio} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(text)


if __name__ == "__main__":
    main()
