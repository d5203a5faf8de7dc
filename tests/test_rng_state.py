"""An epoch checkpoint's random state: a restored process draws what the lost one would have drawn next."""

import random

import torch

from sapt.train.rng_state import restore_rng, rng_file, save_rng


def test_a_restored_process_continues_the_saved_draws(tmp_path):
    torch.manual_seed(3)
    sampler = random.Random(11)
    torch.rand(5), sampler.random()  # some of the epoch already drawn
    save_rng(tmp_path, rank=1, sampler=sampler)
    expected = (torch.rand(4), [sampler.random() for _ in range(3)])

    torch.manual_seed(99)  # a fresh worker: seeded at start, as train_stage seeds it
    fresh = random.Random(11)
    assert restore_rng(tmp_path, rank=1, sampler=fresh)
    assert torch.equal(torch.rand(4), expected[0])
    assert [fresh.random() for _ in range(3)] == expected[1]


def test_each_rank_has_its_own_file_and_a_missing_one_changes_nothing(tmp_path):
    save_rng(tmp_path, rank=0)
    assert rng_file(tmp_path, 0).is_file() and not rng_file(tmp_path, 1).exists()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    assert not restore_rng(tmp_path, rank=1)
    assert torch.equal(torch.get_rng_state(), before)
    # A file saved without a sampler leaves a given sampler where it was.
    sampler = random.Random(4)
    state = sampler.getstate()
    assert restore_rng(tmp_path, rank=0, sampler=sampler)
    assert sampler.getstate() == state
