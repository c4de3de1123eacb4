"""Fault injection for the reliability tests: make a rank fail at a chosen point, on purpose.

Set in the environment of a training job (never in a config file):

    UNCLIP_FAULT_NAN_STEPS=3,4        the loss of these optimizer steps is NaN on every rank
    UNCLIP_FAULT_KILL=RANK@STEP       rank RANK kills itself (SIGKILL) after step STEP
    UNCLIP_FAULT_KILL_MID_STEP=RANK@STEP   ... during step STEP: after its first backward
                                      pass, before the optimizer step
    UNCLIP_FAULT_HANG=RANK@STEP       rank RANK stops responding (sleeps) after step STEP
    UNCLIP_FAULT_KILL_IN_SAVE=STEP    every rank dies with SIGKILL while saving step STEP,
                                      after DeepSpeed's files are written, before meta.json

Unset (the normal case) every check is a dictionary lookup that finds nothing.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Optional


def _steps(name: str) -> set[int]:
    value = os.environ.get(name, "").strip()
    return {int(s) for s in value.split(",") if s.strip()} if value else set()


def _rank_at_step(name: str) -> Optional[tuple[int, int]]:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    rank, _, step = value.partition("@")
    return int(rank), int(step)


class Faults:
    def __init__(self) -> None:
        self.nan_steps = _steps("UNCLIP_FAULT_NAN_STEPS")
        self.kill = _rank_at_step("UNCLIP_FAULT_KILL")
        self.kill_mid_step = _rank_at_step("UNCLIP_FAULT_KILL_MID_STEP")
        self.hang = _rank_at_step("UNCLIP_FAULT_HANG")
        self.kill_in_save = _steps("UNCLIP_FAULT_KILL_IN_SAVE")

    def nan_loss(self, step: int) -> bool:
        return step in self.nan_steps

    def after_backward(self, rank: int, step: int) -> None:
        """Called in optimizer step `step` (1-based) once gradients exist, before they are applied."""
        if self.kill_mid_step == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)

    def after_step(self, rank: int, step: int) -> None:
        if self.kill == (rank, step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self.hang == (rank, step):
            while True:
                time.sleep(3600)

    def during_save(self, step: int) -> None:
        if step in self.kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
