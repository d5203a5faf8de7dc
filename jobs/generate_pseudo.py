"""Ray job entrypoint: ARM pseudo samples of one learned task, from its generator, without training.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.generate_pseudo demo-sapt --task first-word \
            --generator runs:/RUN_ID/generators/01-first-word --output /shared/pseudo/first-word.jsonl

CONFIG and --set are the run's (backbone, order, method_args, seed): with them the prompts equal what
the run remembered of the task. A run logs each task's generator as ``generators/NN-task`` in its
MLflow run; --generator also takes a local folder. Also runs locally (a local Ray). The output is
JSONL rows {"task", "source", "target": ""}, as the run's memory files; its path is the last line.
"""

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from sapt.errors import SaptError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.generate_pseudo", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the run's preset name or YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--task", required=True, help="a task of the config's order")
    parser.add_argument("--generator", required=True,
                        help="the task's generator: a folder or an MLflow URI (runs:/RUN_ID/generators/NN-task)")
    parser.add_argument("--output", required=True, type=Path, help="JSONL file to write")
    parser.add_argument("--count", type=int, default=None, help="how many prompts; default: as many as the run keeps")
    parser.add_argument("--actors", type=int, default=1, help="Ray Data generator actors (one CPU each)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""),
                        help="for a runs:/ or models:/ --generator (default $MLFLOW_TRACKING_URI)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        from sapt.cluster import pseudo_samples
        from sapt.cluster.session import ensure_ray
        from sapt.config import load_config

        run = load_config(args.config, args.overrides)
        plan = pseudo_samples.plan_samples(run, args.task, args.count)
        with tempfile.TemporaryDirectory(prefix="sapt-generator-") as scratch:
            generator = pseudo_samples.local_generator(args.generator, args.tracking_uri, Path(scratch))
            ensure_ray(run.ray.address, num_workers=args.actors, cpus_per_worker=1.0, use_gpu=False)
            rows = pseudo_samples.sample_task(run, plan, generator, actors=args.actors)
    except SaptError as err:
        print(f"generate_pseudo: error: {err}", file=sys.stderr)
        return 2
    if not rows:
        print(f"generate_pseudo: error: the generator of {args.task} wrote only empty prompts", file=sys.stderr)
        return 1
    pseudo_samples.write_rows(rows, args.output)
    for row in rows[:3]:
        print(f"  {row['source'][:100]!r}", file=sys.stderr)
    print(f"{len(rows)} pseudo prompts of {args.task} (of {plan.count} sampled)", file=sys.stderr)
    print(args.output.resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
