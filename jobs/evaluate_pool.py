"""Ray job entrypoint: score a registered pool on the tasks it has learned, without task ids.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.evaluate_pool models:/sapt-lora-long1@champion --data-dir /data/CL_Benchmark

Also runs locally (a local Ray). The MLflow store comes from --tracking-uri or $MLFLOW_TRACKING_URI;
the scores go to a run in the experiment `sapt-eval`, and the last output line is their JSON.
"""

import argparse
import json
import logging
import os
import sys

from sapt.errors import SaptError


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.evaluate_pool", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS (a pool)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", ""))
    parser.add_argument("--data-dir", default="", help="CL_Benchmark root; empty: the embedded benchmark")
    parser.add_argument("--max-train-per-task", type=int, default=None, help="as the run's")
    parser.add_argument("--max-eval-per-task", type=int, default=None, help="as the run's")
    parser.add_argument("--seed", type=int, default=42, help="as the run's: the same items are scored")
    parser.add_argument("--val-size", type=int, default=50, help="as the run's")
    parser.add_argument("--split", choices=("test", "val"), default="test")
    parser.add_argument("--actors", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    try:
        from sapt.cluster.evaluate_pool import evaluate_pool
        from sapt.cluster.session import ensure_ray
        from sapt.registry.model_ref import parse_model_ref

        if not args.tracking_uri:
            raise SaptError("give --tracking-uri or set MLFLOW_TRACKING_URI", source="--tracking-uri")
        ref = parse_model_ref(args.model, need_version=True)
        ensure_ray("", num_workers=args.actors, cpus_per_worker=1.0, use_gpu=False)
        result = evaluate_pool(args.tracking_uri, ref.name, ref.version_or_alias, data_dir=args.data_dir or None,
                               max_train_per_task=args.max_train_per_task,
                               max_eval_per_task=args.max_eval_per_task, seed=args.seed, val_size=args.val_size,
                               split=args.split, actors=args.actors)
    except SaptError as err:
        print(f"evaluate_pool: error: {err}", file=sys.stderr)
        return 2
    for task, score in result["scores"].items():
        print(f"{task:<24} {score:6.1f}", file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
