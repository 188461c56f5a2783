#!/usr/bin/env python
"""qwen3_scratch's training CLI: one subcommand per stage of the recipe.

pretrain: the three-stage pretraining of nbs/35_pretrain from a YAML config (qwen3_scratch/configs/training/) with
dotted key=value overrides (every key: `train.py pretrain --show-keys`). The other stages are planned: each
subcommand (sft, grpo, dpo, rm, eval, generate, chat, pipeline) says so in one line until its notebook lands.

    # the README's main job: the debug model through S1 -> S2 -> S3 on the embedded corpus (CPU, about two minutes)
    python scripts/train.py pretrain --config pretrain_debug

    # one GPU, Qwen3-1.7B shape, stage 1 only, some overrides
    python scripts/train.py pretrain model.preset=small pretrain.run_stages=[s1] optim.lr=3e-4 train.compile=true

    # resume the newest intact checkpoint of the run directory (or --resume runs/pretrain/checkpoints/step_001000)
    python scripts/train.py pretrain --resume latest

    # 8 GPUs of one node (data parallel; FSDP2 with distributed.fsdp_enabled=true)
    torchrun --standalone --nproc_per_node 8 scripts/train.py pretrain model.preset=small
    # or scripts/pretrain.sh, which also launches several nodes

Exit codes: 0 done; 2 a config, data or checkpoint problem, or a planned subcommand (the message says what to do);
3 the run stopped after train.max_bad_steps non-finite losses in a row (a checkpoint was saved first).
"""
import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# subcommands of the recipe that are not built yet, and where they will come from
PLANNED = {"sft": "SFT: long-CoT cold start and thinking-mode fusion (nbs/40_sft)",
           "grpo": "GRPO with verifiable rewards (nbs/54_grpo)", "dpo": "DPO (nbs/56_dpo)",
           "rm": "the reward model (nbs/55_reward_model)", "eval": "evaluation (nbs/60_evaluate)",
           "generate": "generation (nbs/36_generate)", "chat": "chat (nbs/36_generate)",
           "pipeline": "the whole pipeline with its report card"}


def pretrain(args, callbacks=()) -> int:
    from qwen3_scratch.training.config import config_reference, load_train_config
    if args.show_keys:
        for key, tp, default, why in config_reference(): print(f"{key:38} {tp:34} {default:16} {why}")
        return 0
    cfg = load_train_config(args.config, args.overrides, stage="pretrain")
    if args.print_config:
        import dataclasses, yaml
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)); return 0
    from qwen3_scratch.training.pretrain import Pretrainer
    res = Pretrainer(cfg, callbacks=callbacks).run(resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        val = f"{res['val_loss']:.4f}" if res.get("val_loss") is not None else "n/a"
        print(f"done: {res['step']} steps, {res['tokens_seen']:,} tokens, final validation loss {val}; "
              f"checkpoints in {res['checkpoint']}, metrics in {res['metrics']}"
              + (f", plot {res['plot']}" if res.get("plot") else "") + (f", HF weights in {res['hf']}" if res.get("hf") else ""))
    return 0


def planned(name: str) -> int:
    print(f"error: `train.py {name}` is planned but not built yet: {PLANNED[name]} comes in a later version; "
          f"today `train.py pretrain` is what runs", file=sys.stderr)
    return 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    sub = p.add_subparsers(dest="command", required=True, metavar="{pretrain," + ",".join(PLANNED) + "}")
    pt = sub.add_parser("pretrain", help="pretrain through the stages of a training config",
                        description="Pretrain a Qwen3 through the stages of a training config (nbs/35_pretrain).")
    pt.add_argument("--config", default="pretrain", help="a packaged training config (pretrain, pretrain_debug) or a YAML path")
    pt.add_argument("--resume", default=None, help="'latest' (newest intact checkpoint under <out_dir>/checkpoints) or a step_N directory")
    pt.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    pt.add_argument("--show-keys", action="store_true", help="print every config key with its type, default and reason, and exit")
    pt.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=3e-4 pretrain.run_stages=[s1]")
    pt.set_defaults(func=pretrain)
    for name, what in PLANNED.items(): sub.add_parser(name, help=f"planned: {what}", add_help=False)
    return p


def _one_line_warnings(message, category, filename, lineno, file=None, line=None):
    print(f"warning: {message}", file=sys.stderr)


def main(argv=None, callbacks=()) -> int:
    "Run the CLI on `argv`; `callbacks` (training-loop `Callback`s) go to the run (tests inject faults this way)."
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PLANNED: return planned(argv[0])     # whatever follows: it cannot run yet
    args = parser().parse_args(argv)
    warnings.showwarning = _one_line_warnings
    from qwen3_scratch.errors import Qwen3Error
    import torch.distributed as dist
    ok = False
    try:
        code = args.func(args, callbacks=callbacks); ok = code == 0
        return code
    except Qwen3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted: resume with --resume latest", file=sys.stderr)
        return 130
    finally:
        if dist.is_available() and dist.is_initialized():
            if ok: dist.barrier()                       # every rank is done before the group goes away
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
