"""Adapters that die on cue, to test what survives a killed process (imported by name, so they register once)."""
from __future__ import annotations

import os
import signal

from methods import METHODS, register_method


class Killed(Exception):
    """What a killable adapter raises, as a killed process stops mid-run."""


def killable(base: str) -> type:
    """Adapter ``base`` registered as ``_killable_<base>``: raises :class:`Killed` at call ``kill_at`` of its
    training step, or sends its own process SIGINT (as Ctrl-C does) at call ``interrupt_at`` and goes on
    (None: never); ``calls`` counts the calls of every instance."""

    class Killable(METHODS.get(base)):
        kill_at: int | None = None
        interrupt_at: int | None = None
        calls = 0

        def training_step(self, batch):
            type(self).calls += 1
            if type(self).calls == self.kill_at:
                raise Killed
            if type(self).calls == self.interrupt_at:
                os.kill(os.getpid(), signal.SIGINT)
            return super().training_step(batch)

    Killable.__name__ = Killable.__qualname__ = f"Killable{METHODS.get(base).__name__}"
    return register_method(f"_killable_{base}")(Killable)


KillableSimCLR = killable("simclr")
KillableMoCo = killable("moco")
KillableCC = killable("cc")  # logs scalars beside its loss
