#!/usr/bin/env python
"""qwen3_scratch's training CLI. Subcommands: pretrain (sft, grpo, dpo and eval come with their notebooks).

pretrain: the three-stage pretraining of nbs/35_pretrain from a YAML config (qwen3_scratch/configs/training/) with
dotted key=value overrides.

    # the README's main job: the debug model through S1 -> S2 -> S3 on the embedded corpus (CPU, a few minutes)
    python scripts/train.py pretrain --config pretrain_debug

    # one GPU, Qwen3-1.7B shape, stage 1 only, some overrides
    python scripts/train.py pretrain model=small run_stages=[s1] optim.lr=3e-4 train.compile=true

    # resume the newest complete checkpoint of the run directory (or --resume runs/pretrain/checkpoints/step_001000)
    python scripts/train.py pretrain --resume latest

    # 8 GPUs of one node (data parallel; FSDP2 with train.data_parallel=fsdp)
    torchrun --standalone --nproc_per_node 8 scripts/train.py pretrain model=small
    # or scripts/pretrain.sh, which also launches several nodes

Exit codes: 0 done; 2 a config, data or checkpoint problem (the message says what to fix); 3 the run stopped after
train.max_bad_steps non-finite losses in a row (a checkpoint was saved first).
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pretrain(args) -> int:
    from qwen3_scratch.training.pretrain import Trainer, load_train_config
    cfg = load_train_config(args.config, args.overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg, sort_keys=False)); return 0
    res = Trainer(cfg).run(resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        val = f"{res['val_loss']:.4f}" if res.get("val_loss") is not None else "n/a"
        print(f"done: {res['step']} steps, {res['tokens_seen']:,} tokens, final validation loss {val}; "
              f"checkpoints in {res['checkpoint']}, metrics in {res['metrics']}"
              + (f", plot {res['plot']}" if res.get("plot") else "") + (f", HF weights in {res['hf']}" if res.get("hf") else ""))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="{pretrain}")
    pt = sub.add_parser("pretrain", help="pretrain through the stages of a training config",
                        description="Pretrain a Qwen3 through the stages of a training config (nbs/35_pretrain).")
    pt.add_argument("--config", default="pretrain", help="a packaged training config (pretrain, pretrain_debug) or a YAML path")
    pt.add_argument("--resume", default=None, help="'latest' (newest complete checkpoint under <out_dir>/checkpoints) or a step_N directory")
    pt.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    pt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4 run_stages=[s1]")
    pt.set_defaults(func=pretrain)
    args = p.parse_args(argv)
    from qwen3_scratch.training.pretrain import TrainError
    try:
        return args.func(args)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: resume with --resume latest", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized(): dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
