"""The `sapt` command: argument parsing and error mapping only.

Logs go to stderr; the last line on stdout is the machine-readable answer (a path, or JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from sapt.errors import SaptError

EXIT_BAD_INPUT = 2


def _cmd_run(args: argparse.Namespace) -> None:
    from sapt.config import load_config
    from sapt.runner import format_matrix, run_sequence

    run = load_config(args.config, args.set)
    path = run_sequence(run)
    results = json.loads(path.read_text())
    _shutdown_ray()  # flush forwarded worker logs before our last line
    ml = results["mlflow"]
    print(format_matrix(results))
    print(f"MLflow: experiment {ml['experiment_id']}, run {ml['run_id']}; "
          f"browse with: mlflow ui --backend-store-uri {ml['tracking_uri']}")
    print(path)


def _cmd_metrics(args: argparse.Namespace) -> None:
    from sapt.evaluation.metrics import cl_metrics, load_matrix_file

    data = load_matrix_file(args.file)
    print(json.dumps(cl_metrics(data["matrix"], data.get("single"))))


def _shutdown_ray() -> None:
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except ImportError:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sapt", description="Continual learning of LLMs with SAPT on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a continual-learning sequence")
    run.add_argument("config", help="a YAML file or a preset name (e.g. demo)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key; the value is YAML (order=[sst2,rte])")
    run.set_defaults(handler=_cmd_run)
    metrics = commands.add_parser("metrics", help="AP, F.Ra, FWT, BWT of an accuracy matrix file")
    metrics.add_argument("file", help='JSON with "matrix" and optionally "single"')
    metrics.set_defaults(handler=_cmd_metrics)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("SAPT_LOG_LEVEL", "INFO"), stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        args.handler(args)
    except SaptError as err:
        print(f"sapt: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


if __name__ == "__main__":
    sys.exit(main())
