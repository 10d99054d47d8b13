"""Two local processes set up as `torchrun --nproc_per_node=2` sets them (gloo on CPU), for the DDP tests."""
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp


def run_two_ranks(worker, out_dir) -> list:
    """worker(rank, out_dir) in two processes on a free local port; what each saved as out_dir/rank{r}.pt."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_as_rank, args=(worker, str(out_dir), port), nprocs=2, join=True)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in (0, 1)]


def _as_rank(rank, worker, out_dir, port):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    worker(rank, out_dir)
