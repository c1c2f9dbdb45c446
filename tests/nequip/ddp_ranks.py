"""Worker of the two-rank gloo test in test_callback_ddp.py, in its own light module: the spawned
processes import only numpy, torch.distributed and ltau_ase.core (not nequip or Lightning)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ltau_ase.core.atom_ids import global_atom_ids
from ltau_ase.core.errorlog import check_rank_epochs, check_rank_universes, universe_digest


def rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One of two gloo ranks: disagreeing universes, then one rank missing the epoch."""
    import torch.distributed as dist

    def all_gather(obj):  # what the callback does (ltau_ase.nequip.callback._all_gather_object)
        out = [None, None]
        dist.all_gather_object(out, obj)
        return out

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    results = []
    ids = global_atom_ids(np.arange(10 + rank), np.full(10 + rank, 3))  # rank 1 read one frame more
    for check, arg in [
        (check_rank_universes, universe_digest(ids)),
        (check_rank_epochs, {"epoch": 5 if rank == 0 else None, "mode": "exact", "n_atoms": 30 - 30 * rank, "error": None}),
    ]:
        try:
            check(all_gather(arg))
            results.append("passed")
        except ValueError as exc:
            results.append(str(exc))
    dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.txt").write_text("\n".join(results))
