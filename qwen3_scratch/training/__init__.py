"""Training loops, optimizer, schedules, checkpoints (nbs/3x-5x)."""
