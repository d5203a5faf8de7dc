"""`sapt sweep`: argument parsing only. ``add_sweep_command`` plugs it into the `sapt` parser.

The sweep's progress goes to stderr, everything Ray, Tune and the trials print to the sweep folder's
logs/run-*.log (``--verbose``: to stderr too); the last stdout line is the best config's YAML path (one
order), or a JSON object order -> path (several).
"""

from __future__ import annotations

import argparse
import json


def _cmd_sweep(args: argparse.Namespace) -> None:
    from sapt.console import Console, log_path
    from sapt.tuning import sweep

    plan = sweep.plan_sweep(sweep.SweepRequest(  # a bad request fails here, before the log folder exists
        config=args.config, overrides=args.set, space=args.space, orders=args.order, samples=args.samples,
        concurrent=args.concurrent, name=args.name, output=args.output, resume=args.resume,
    ))
    # Ray's, Tune's and the trials' own output goes to the sweep's log file; the terminal gets our
    # progress lines (each trial's start, per-task validation AP, end, the best config).
    console = Console(log_path(plan.folder), verbose=args.verbose)
    with console:
        print(f"log: {console.path}", file=console.err, flush=True)
        best = sweep.execute_sweep(plan)
    if len(best) == 1:
        print(next(iter(best.values())))
    else:
        print(json.dumps({label: str(path) for label, path in best.items()}))


def add_sweep_command(subparsers) -> argparse.ArgumentParser:
    """Adds ``sweep`` to the `sapt` subcommands (``parser.add_subparsers()``) and sets its handler."""
    sweep = subparsers.add_parser(
        "sweep", help="tune a method's knobs with Ray Tune: whole orders per trial, scored on validation",
        description="One Tuner per order (Optuna search, ASHA stopping between tasks). Each trial runs the "
                    "whole order on the validation split; the best trial's config is written for `sapt run`. "
                    "An existing sweep folder is resumed: finished trials are kept. docs/sweeps.md has more.")
    sweep.add_argument("config", help="a YAML file or a preset name (e.g. demo-sapt)")
    sweep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config key of the base config; the value is YAML")
    sweep.add_argument("--space", default="", metavar="FILE",
                       help="search-space YAML (default: tuning/<method>.yaml)")
    sweep.add_argument("--samples", type=int, default=8, help="trials per order (default: 8)")
    sweep.add_argument("--concurrent", type=int, default=1, help="trials running at a time (default: 1)")
    sweep.add_argument("--order", action="append", default=[], metavar="NAME_OR_LIST",
                       help="a named order, [task,task] or task,task; repeat for several (default: the config's)")
    sweep.add_argument("--name", default="", help="the sweep's name and MLflow experiment (default: the config's)")
    sweep.add_argument("--output", default="", metavar="DIR", help="sweep folder (default: runs/sweeps/NAME)")
    sweep.add_argument("--resume", action="store_true",
                       help="continue the interrupted sweep in the folder (fails if there is none; an existing "
                            "folder is resumed even without it)")
    sweep.add_argument("--verbose", action="store_true",
                       help="also show Ray's, Tune's and the trials' own output (it always goes to the sweep's log file)")
    sweep.set_defaults(handler=_cmd_sweep)
    return sweep
