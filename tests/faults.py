#!/usr/bin/env python
"""scripts/train.py with faults injected, for the crash tests (never used by the library):

    python tests/faults.py [--kill-after-ckpt N] [--kill-at-step N] [--kill-in-ckpt N] [--nan-steps 3,4] -- pretrain ...

--kill-after-ckpt N  SIGKILL once step N's checkpoint is complete (a training-loop callback)
--kill-at-step N     SIGKILL right after step N is logged (later steps than the checkpoint get logged twice otherwise)
--kill-in-ckpt N     SIGKILL in the middle of writing step N's checkpoint: every shard written, not yet renamed
                     (the checkpoint module's finaliser is wrapped)
--nan-steps 3,4      those global steps get a NaN loss (a training-loop callback)
"""
import argparse, os, signal, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

import train  # noqa: E402  scripts/train.py
from qwen3_scratch.training import checkpoint  # noqa: E402
from qwen3_scratch.training.loop import Callback  # noqa: E402


def _die(): os.kill(os.getpid(), signal.SIGKILL)


class KillAfterCheckpoint(Callback):
    def __init__(self, step): self.step = step
    def on_checkpoint(self, loop, path):
        if loop.state.step == self.step: loop.checkpointer.wait(); _die()


class KillAtStep(Callback):
    def __init__(self, step): self.step = step
    def on_step_end(self, loop, record):
        if loop.state.step == self.step: _die()


class NaNAtSteps(Callback):
    def __init__(self, steps): self.steps = set(steps)
    def on_loss(self, loop, loss): return loss * float("nan") if loop.state.step + 1 in self.steps else loss


def kill_inside_checkpoint(step: int):
    "Wrap the checkpoint finaliser: at `step`, SIGKILL after the shards are written and before the rename."
    finalize = checkpoint._finalize
    def wrapped(tmp, final, s, *a, **k):
        if s == step and any(Path(tmp).iterdir()): _die()
        return finalize(tmp, final, s, *a, **k)
    checkpoint._finalize = wrapped


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, rest = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else ([], argv)
    p = argparse.ArgumentParser(prog="faults.py")
    p.add_argument("--kill-after-ckpt", type=int); p.add_argument("--kill-at-step", type=int)
    p.add_argument("--kill-in-ckpt", type=int); p.add_argument("--nan-steps", default="")
    a = p.parse_args(ours)
    callbacks = []
    if a.kill_after_ckpt: callbacks.append(KillAfterCheckpoint(a.kill_after_ckpt))
    if a.kill_at_step: callbacks.append(KillAtStep(a.kill_at_step))
    if a.nan_steps: callbacks.append(NaNAtSteps(int(s) for s in a.nan_steps.split(",")))
    if a.kill_in_ckpt: kill_inside_checkpoint(a.kill_in_ckpt)
    return train.main(rest, callbacks=callbacks)


if __name__ == "__main__":
    sys.exit(main())
