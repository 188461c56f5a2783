"""Run a test function on several gloo ranks (CPU processes): a free port, one process group per process, one thread
each, a barrier before the group is destroyed, and a timeout so that a failing rank does not hang the others."""
import os, socket
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s: s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def spawn(fn, world: int, *args, timeout_s: int = 300):
    "Run `fn(rank, world, *args)` on `world` gloo ranks (module-level functions only: they are pickled)."
    mp.spawn(_entry, args=(fn, world, free_port(), timeout_s, args), nprocs=world, join=True)


def _entry(rank, fn, world, port, timeout_s, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=timeout_s))
    try: fn(rank, world, *args)
    finally:
        dist.barrier(); dist.destroy_process_group()
