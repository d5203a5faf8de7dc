"""When a loss has stopped falling: compare the mean loss of consecutive windows of steps.

ARM's generator has a step budget (``generator_steps``) that a small task reaches long after its
loss has flattened; stopping there is most of the generator's cost saved (docs/sapt.md).
"""

from __future__ import annotations

from collections.abc import Callable


class Plateau:
    """Says stop once a window's mean loss improves on the best window before it by less than
    ``min_improvement`` (relative).

    Every rank must take the same decision on the same step (the engine steps in lockstep), so
    ``reduce`` turns this rank's window mean into the mean over ranks (identity on one rank).

    Args:
        window: steps per window; the decision is taken only at a window's end.
        min_improvement: e.g. 0.02 = stop when the window is not at least 2% below the best so far;
            0 never stops.
        reduce: this rank's window mean -> the mean over all ranks.
    """

    def __init__(self, window: int, min_improvement: float, reduce: Callable[[float], float] = lambda x: x):
        if window < 1:
            raise ValueError("window must be at least 1 step")
        self.window, self.min_improvement, self.reduce = window, min_improvement, reduce
        self.means: list[float] = []  # mean loss of each finished window, over ranks
        self._recent: list[float] = []

    def update(self, loss: float) -> bool:
        """Adds one step's loss; True when training should stop after this step."""
        self._recent.append(loss)
        if len(self._recent) < self.window:
            return False
        mean = self.reduce(sum(self._recent) / len(self._recent))
        self._recent.clear()
        best = min(self.means, default=None)
        self.means.append(mean)
        if best is None or self.min_improvement <= 0:
            return False
        return mean > best * (1 - self.min_improvement)
