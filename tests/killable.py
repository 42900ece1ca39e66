"""A SimCLR that dies on cue, to test what survives a killed process (imported by name, so it registers once)."""
from __future__ import annotations

from methods import METHODS, register_method


class Killed(Exception):
    """What :class:`KillableSimCLR` raises, as a killed process stops mid-run."""




@register_method("_killable_simclr")
class KillableSimCLR(METHODS.get("simclr")):
    """SimCLR that raises :class:`Killed` at call ``kill_at`` of its training step (None: never);
    ``calls`` counts the calls of every instance."""

    kill_at: int | None = None
    calls = 0

    def training_step(self, batch):
        type(self).calls += 1
        if type(self).calls == self.kill_at:
            raise Killed
        return super().training_step(batch)
