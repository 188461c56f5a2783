#!/usr/bin/env python
"""The debug model's training step on a CPU, with glibc's default allocator and with `keep_freed_memory()`.

    python benchmarks/bench_cpu_step.py                      # writes benchmarks/cpu_step.md
    python benchmarks/bench_cpu_step.py --threads 2 --reps 5

One step = forward + backward of the LM loss on 4 x 128 tokens (Qwen3's 151,936-token vocabulary, 23M parameters,
PyTorch kernels) + AdamW (foreach) + zero_grad, in float32 and under bf16 autocast, which is what
`scripts/train.py pretrain --config pretrain_debug` runs. Each configuration runs in its own process (the allocator
setting is per process and cannot be undone); the table gives the median of --reps steps after 2 warm-up steps, the
user and system CPU seconds a step, and the page faults a step. It also checks that both allocators give bitwise the
same losses. A CPU without bf16 instructions can be imitated with ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2.
"""
import argparse, datetime, json, os, platform, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, statistics, sys, time, torch
sys.path.insert(0, sys.argv[1])
from qwen3_scratch.model.config import ModelConfig
from qwen3_scratch.model.transformer import Qwen3Model
from qwen3_scratch.training.loop import keep_freed_memory
keep, amp, reps, threads = sys.argv[2] == "1", sys.argv[3] == "1", int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
if keep: assert keep_freed_memory()
torch.manual_seed(0)
m = Qwen3Model(ModelConfig.from_preset("debug", kernels="torch"))
opt = torch.optim.AdamW(m.parameters(), lr=1e-3, foreach=True)
ids = torch.randint(0, 151000, (4, 129), generator=torch.Generator().manual_seed(1))
losses = []
def step():
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp): out = m(ids[:, :-1], labels=ids[:, 1:])
    out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True); losses.append(out.loss.item())
for _ in range(2): step()
times, r0 = [], resource.getrusage(resource.RUSAGE_SELF)
for _ in range(reps):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
r = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"step_s": statistics.median(times), "user_s": (r.ru_utime - r0.ru_utime) / reps,
                  "sys_s": (r.ru_stime - r0.ru_stime) / reps, "faults": (r.ru_minflt - r0.ru_minflt) / reps, "losses": losses}))
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "cpu_step.md"))
    ap.add_argument("--append", action="store_true", help="add this run's table to --out (e.g. a run imitating a CPU without bf16)")
    a = ap.parse_args()
    res = {}
    for amp in (False, True):
        for keep in (False, True):
            r = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), str(int(keep)), str(int(amp)), str(a.reps), str(a.threads)],
                               capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            if r.returncode: sys.exit(f"the step failed:\n{r.stderr[-3000:]}")
            res[amp, keep] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{'bf16' if amp else 'fp32'} keep_freed_memory={keep}: {res[amp, keep]['step_s']:.3f} s a step", flush=True)
    import torch
    from qwen3_scratch.training.loop import bf16_is_fast
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").is_file() else platform.processor()
    env = " ".join(f"{k}={os.environ[k]}" for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ)
    lines = ([] if a.append else ["# The debug model's training step on a CPU: glibc's allocator vs `keep_freed_memory()`"]) + ["",
             f"{cpu}, {a.threads} threads, torch {torch.__version__}, {datetime.date.today()}; "
             f"bf16 instructions: {bf16_is_fast('cpu')[1]}.", "",
             f"Command: `{env + ' ' if env else ''}python benchmarks/bench_cpu_step.py --threads {a.threads} --reps {a.reps}` "
             "(each row its own process; median of the timed steps after 2 warm-up steps).", "",
             "| autocast | allocator | s a step | user CPU s | system CPU s | page faults | speed-up | same losses |",
             "|---|---|---|---|---|---|---|---|"]
    for amp in (False, True):
        base = res[amp, False]
        for keep in (False, True):
            x = res[amp, keep]
            lines.append(f"| {'bf16' if amp else 'none (fp32)'} | {'keep_freed_memory()' if keep else 'glibc default'} | "
                         f"{x['step_s']:.3f} | {x['user_s']:.2f} | {x['sys_s']:.2f} | {x['faults']:,.0f} | "
                         f"{base['step_s'] / x['step_s']:.2f}x | {'yes' if x['losses'] == base['losses'] else 'NO'} |")
    text = "\n".join(lines) + "\n"
    if a.append: text = Path(a.out).read_text() + text
    Path(a.out).write_text(text)
    print("\n".join(lines)); print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
