#!/usr/bin/env python
"""CPU data pipeline: tokenisation throughput into uint32 shards, and window throughput of PackedTextDataset.

    OMP_NUM_THREADS=1 python benchmarks/bench_data.py                           # prints the table
    OMP_NUM_THREADS=1 python benchmarks/bench_data.py --out benchmarks/data.md

Tokenisation: tokenize_to_shards over tinyshakespeare + pride_and_prejudice (split at blank lines), with 1 and
--procs processes; MB/s of UTF-8 input, and per core. Best of --reps runs into a fresh folder each time.
Loading: windows of --seq-len + 1 tokens from the memmapped shards (shuffled order, page cache warm: the files are
1-2 MB), through PackedTextDataset.__getitem__ and a torch.stack of a batch of --batch windows, on one thread.
"""
import argparse, datetime, os, platform, shutil, sys, tempfile, time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from qwen3_scratch.data.dataset import PackedTextDataset, tokenize_to_shards  # noqa: E402
from qwen3_scratch.data.tokenizer import Tokenizer  # noqa: E402

DATA = Path(os.environ.get("QWEN3_DATA_DIR") or Path(__file__).resolve().parents[2]/"shared"/"data")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"): return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--procs", type=int, default=min(2, os.cpu_count()))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=3.0, help="how long to iterate windows")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(1)
    files = [DATA/"pretrain"/"tinyshakespeare.txt", DATA/"pretrain"/"pride_and_prejudice.txt"]
    if not all(f.exists() for f in files): sys.exit(f"{DATA}/pretrain is absent: set QWEN3_DATA_DIR to the shared data folder")
    mb = sum(len(f.read_text().encode()) for f in files) / 1e6
    tok = Tokenizer()
    tmp = Path(tempfile.mkdtemp())
    rows = []
    try:
        for procs in sorted({1, a.procs}):
            best, meta = float("inf"), None
            for r in range(a.reps):
                out = tmp/f"tok{procs}_{r}"
                t0 = time.perf_counter()
                meta = tokenize_to_shards(files, out, tok, split_blank_lines=True, shard_chars=200_000,
                                          num_proc=procs, progress=False)
                best = min(best, time.perf_counter() - t0)
            rows.append(("tokenise", f"{procs} process{'es' * (procs > 1)}", f"{mb / best:.2f} MB/s",
                         f"{mb / best / procs:.2f} MB/s", f"{meta['n_tokens'] / best:,.0f} tokens/s"))
        ds = PackedTextDataset(out, a.seq_len, tok, seed=0)
        n_windows = len(ds)

        def bench(fn, tokens_per_call):
            fn(0)  # warm-up: page in the shards
            calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < a.seconds: fn(calls); calls += 1
            return calls * tokens_per_call / (time.perf_counter() - t0)

        def one(i): ds[i % n_windows]
        def batch(i):
            items = [ds[(i * a.batch + j) % n_windows] for j in range(a.batch)]
            return torch.stack([x["input_ids"] for x in items]), torch.stack([x["labels"] for x in items])
        rows.append(("load", f"__getitem__, 1 thread", "", "", f"{bench(one, a.seq_len):,.0f} tokens/s"))
        rows.append(("load", f"__getitem__ + torch.stack of {a.batch}, 1 thread", "", "",
                     f"{bench(batch, a.seq_len * a.batch):,.0f} tokens/s"))
    finally: shutil.rmtree(tmp)

    cmd = "OMP_NUM_THREADS=1 python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    lines = ["# Data pipeline on the CPU: tokenisation and packed-window loading", "",
             f"- CPU: {cpu_model()}, {os.cpu_count()} cores visible; date: {datetime.date.today()}; "
             f"python {platform.python_version()}; torch {torch.__version__}",
             f"- command: `{cmd}`",
             f"- corpus: tinyshakespeare.txt + pride_and_prejudice.txt = {mb:.2f} MB UTF-8, split at blank lines into "
             f"{meta['n_docs']:,} documents, {meta['n_tokens']:,} tokens (with one EOS each), {len(meta['shards'])} shards",
             f"- tokenise: `tokenize_to_shards` (tiktoken Qwen3 BPE, writing uint32 shards), best of {a.reps}; "
             f"a 2-process run also pays for starting its pool"
             f" (fork), which this {mb:.1f} MB corpus does not hide",
             f"- load: {n_windows} windows of {a.seq_len} + 1 tokens in shuffled order, shards in the page cache, "
             f"for {a.seconds:.0f} s; target >= 1M tokens/s on one core", "",
             "| stage | setting | throughput | per core | tokens/s |", "|---|---|---:|---:|---:|"]
    lines += [f"| {' | '.join(r)} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out: a.out.write_text(text)


if __name__ == "__main__":
    main()
