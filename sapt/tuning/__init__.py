"""`sapt sweep`: Ray Tune over whole continual-learning sequences (one trial = one order, scored on
validation), with the search spaces of the top-level `tuning/` folder. docs/sweeps.md describes it.

space.py reads a space file; configs.py turns sampled values into run configs; trial.py is the trial's
driver function; sweep.py runs one Tuner per order; summary.py picks the best and writes results.
The Ray Tune calls themselves live in sapt.cluster.tune (only sapt.cluster imports Ray).
"""
