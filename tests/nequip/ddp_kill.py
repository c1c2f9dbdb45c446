"""A Lightning callback for the DDP tests: SIGKILLs one rank in the middle of one epoch.

Listed in a test's nequip YAML config as ``_target_: ddp_kill.KillRankMidEpoch`` (the test puts this
directory on PYTHONPATH); it simulates a node failure, not a Python exception.
"""
from __future__ import annotations

import os
import signal

import lightning


class KillRankMidEpoch(lightning.Callback):
    """SIGKILL rank ``rank`` before batch ``batch`` of epoch ``epoch``."""

    def __init__(self, rank: int = 1, epoch: int = 1, batch: int = 1) -> None:
        self.rank, self.epoch, self.batch = rank, epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == self.epoch and batch_idx == self.batch:
            os.kill(os.getpid(), signal.SIGKILL)
