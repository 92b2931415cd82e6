"""Several processes (torchrun): who writes the run folder, each process's share of a list of prompts, and
the shares gathered back in the order of the whole list, so that every process gets every answer."""
import gc
import os

import torch
import torch.distributed as dist
from tqdm import tqdm

from generate import generate, prompt_seeds


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def join_processes(device):
    """Under torchrun (RANK set), join the process group: gloo on CPU; on CUDA each process takes its own GPU,
    NCCL for CUDA tensors and gloo for the CPU ones (the trainers all-reduce a few CPU numbers). True when
    this call formed the group, so it closes it too."""
    if "RANK" not in os.environ or dist.is_initialized():
        return False
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo")
    return True


def rank_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    """The process that writes the run folder (the only one without torchrun)."""
    return rank_world()[0] == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def my_share(items, rank=None, world=None):
    """This process's share of a list: every world-th item from its rank on (all of it in one process)."""
    rank, world = rank_world() if rank is None else (rank, world)
    return items[rank::world]


def in_order(parts):
    """The shares of every rank (my_share's) put back in the order of the whole list."""
    out = [None] * sum(len(p) for p in parts)
    for rank, part in enumerate(parts):
        out[rank::len(parts)] = part
    return out


def gather_in_order(part):
    """Every process's results for its share, gathered: each process gets the results of the whole list."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return part
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, part)
    return in_order(parts)


def generate_shared(model, tok, prompts, seed=None, **kw):
    """generate() with each process answering its share of the prompts; all get every answer. A prompt's
    sampling seed comes from its place in the whole list, so the answers are those of one process."""
    seeds = prompt_seeds(seed, len(prompts)) if seed is not None else None
    mine = generate(model, tok, my_share(list(prompts)), seed=seeds and my_share(seeds), **kw)
    return gather_in_order(mine)


def progress_bar(desc, total):
    """A bar over this process's share of `total` prompts, shown by the first process only."""
    return tqdm(total=len(my_share(range(total))), desc=desc, unit="prompt", leave=False, dynamic_ncols=True,
                disable=not is_main())
