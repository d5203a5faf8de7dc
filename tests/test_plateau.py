"""The generator's stopping rule: stop once a window's mean loss no longer beats the best one enough."""

import pytest

from sapt.train.plateau import Plateau


def _stop_step(plateau: Plateau, losses: list[float]) -> int | None:
    """The 1-based step after which the rule says stop (None: it never does)."""
    return next((step for step, loss in enumerate(losses, 1) if plateau.update(loss)), None)


def test_a_falling_loss_runs_on_and_a_flat_one_stops_at_its_first_window():
    falling = [10 * 0.9 ** (step // 5) for step in range(40)]  # 10% lower every window of 5
    assert _stop_step(Plateau(5, 0.02), falling) is None
    flat_after_20 = falling[:20] + [falling[19]] * 20
    # Window 4 (steps 16-20) is the last one that falls; window 5 equals it.
    assert _stop_step(Plateau(5, 0.02), flat_after_20) == 25


def test_the_improvement_is_relative_to_the_best_window_not_the_last():
    # Windows of 2: means 4, 2, 3 (a bump), 1.99 (0.5% below the best): stop there, not at the bump.
    plateau = Plateau(2, 0.02)
    assert _stop_step(plateau, [4, 4, 2, 2, 3, 3]) == 6  # the bump is no improvement
    assert plateau.means == [4, 2, 3]
    assert _stop_step(Plateau(2, 0.02), [4, 4, 2, 2, 1.5, 1.5, 1.49, 1.49]) == 8


def test_zero_improvement_never_stops():
    assert _stop_step(Plateau(3, 0.0), [1.0] * 30) is None


def test_the_decision_uses_the_mean_over_ranks():
    """Rank A's loss is flat, rank B's falls: the mean over both still falls, so neither stops."""
    other_rank = iter([8.0, 4.0, 2.0, 1.0])
    plateau = Plateau(2, 0.02, reduce=lambda mine: (mine + next(other_rank)) / 2)
    assert _stop_step(plateau, [5.0] * 8) is None
    assert plateau.means == [6.5, 4.5, 3.5, 3.0]


def test_a_window_must_hold_a_step():
    with pytest.raises(ValueError, match="window"):
        Plateau(0, 0.02)
