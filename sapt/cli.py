"""The `sapt` command: argument parsing and error mapping only.

Logs go to stderr; the last line on stdout is the machine-readable answer (a path, or JSON).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from sapt.errors import SaptError

EXIT_BAD_INPUT = 2


def _cmd_run(args: argparse.Namespace) -> None:
    from sapt.config import load_config
    from sapt.console import Console, StageBars, log_path
    from sapt.runner import format_matrix, run_sequence

    run = load_config(args.config, args.set)
    console = Console(log_path(run.output_dir), verbose=args.verbose)
    with console:
        # Named once the input has passed its checks (a bad input gets its one error line only).
        bars = StageBars(console.err, bars=False if args.verbose else None, intro=f"log: {console.path}")
        ray_before = _ray_connected()  # a Ray that this call did not start is not ours to stop
        try:
            path = run_sequence(run, resume=args.resume, on_progress=bars)
        except BaseException as err:
            bars.close()
            if not isinstance(err, SaptError):
                print(f"sapt: the run stopped; its full output is in {console.path}", file=console.err, flush=True)
            if not ray_before:
                _shutdown_ray()  # its processes' last lines into the log, not onto the terminal
            raise
        bars.close()
        results = json.loads(path.read_text())
        _shutdown_ray()  # its processes' last lines into the log, before ours
    ml = results["mlflow"]
    print(format_matrix(results))
    print(f"MLflow: experiment {ml['experiment_id']}, run {ml['run_id']}; "
          f"browse with: mlflow ui --backend-store-uri {ml['tracking_uri']}")
    print(path.resolve())


def _cmd_zero_shot(args: argparse.Namespace) -> None:
    from sapt.cluster.zero_shot import run_zero_shot
    from sapt.config import load_config
    from sapt.console import Console, log_path

    run = load_config(args.config, args.set)
    with Console(log_path(run.output_dir), verbose=args.verbose) as console:
        print(f"log: {console.path}", file=console.err, flush=True)
        try:
            path = run_zero_shot(run, actors=args.actors)
        finally:
            _shutdown_ray()
    result = json.loads(path.read_text())
    for task, score in result["scores"].items():
        print(f"{task:<32} {score:6.1f}")
    print(f"{'mean':<32} {result['mean']:6.1f}  ({run.backbone}, no training, {result['split']} split, "
          f"{result['seconds']:.0f} s)")
    print(path.resolve())


def _cmd_metrics(args: argparse.Namespace) -> None:
    from sapt.evaluation.metrics import cl_metrics, load_matrix_file

    data = load_matrix_file(args.file)
    print(json.dumps(cl_metrics(data["matrix"], data.get("single"))))


def _tracking_uri(args: argparse.Namespace) -> str:
    uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        raise SaptError("give --tracking-uri (e.g. sqlite:///runs/demo/mlflow.db or http://HOST:5000) "
                        "or set MLFLOW_TRACKING_URI", source="--tracking-uri")
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # relative: Ray actors run elsewhere
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def _cmd_registry_list(args: argparse.Namespace) -> None:
    from sapt.registry import pool_store

    models = pool_store.list_pools(_tracking_uri(args))
    for m in models:
        aliases = ", ".join(f"{a}->{v}" for a, v in m["aliases"].items())
        print(f"{m['name']:<40} {m['kind']:<7} {m['versions']:>3} versions  {m['method'] or ''}  {aliases}")
    print(json.dumps(models))


def _cmd_registry_show(args: argparse.Namespace) -> None:
    from sapt.registry import pool_store
    from sapt.registry.model_ref import parse_model_ref

    ref = parse_model_ref(args.model)
    found = pool_store.show(_tracking_uri(args), ref.name, ref.version_or_alias)
    for version in found.get("versions", [found]):
        tags = version["tags"]
        metrics = " ".join(f"{k[len('metric.'):]}={float(v):.2f}" for k, v in sorted(tags.items())
                           if k.startswith("metric."))
        print(f"{version['uri']:<40} task {int(tags.get('task_index', -1)) + 1} {tags.get('task_name', '')}  "
              f"{metrics}  {' '.join(version['aliases'])}")
    print(json.dumps(found))


def _cmd_registry_promote(args: argparse.Namespace) -> None:
    from sapt.registry import pool_store
    from sapt.registry.model_ref import parse_model_ref

    ref = parse_model_ref(args.model, need_version=True)
    uri = _tracking_uri(args)
    found = pool_store.promote(uri, ref.name, _version_number(uri, ref), args.alias)
    print(f"models:/{ref.name}@{args.alias} -> version {found['version']}")
    print(json.dumps(found))


def _version_number(uri: str, ref) -> int:
    from sapt.registry import pool_store

    return pool_store.show(uri, ref.name, ref.version_or_alias)["version"]


def _cmd_predict(args: argparse.Namespace) -> None:
    from sapt.registry import pool_store
    from sapt.registry.model_ref import parse_model_ref

    ref = parse_model_ref(args.model, need_version=True)
    uri = _tracking_uri(args)
    version = _version_number(uri, ref)  # every actor loads this one, even if the alias moves meanwhile
    model_config = {"device": args.device} if args.device else {}
    if args.input is not None:
        import pandas as pd

        out = pool_store.load_pool(uri, ref.name, version, model_config=model_config).predict(
            pd.DataFrame({"input": [args.input]}))
        print(json.dumps({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in out.iloc[0].items()}))
        return
    from sapt.cluster.batch_predict import check_input_file, predict_file
    from sapt.cluster.session import ensure_ray

    source = Path(args.file)
    target = Path(args.output) if args.output else source.with_name(source.stem + ".predictions.jsonl")
    check_input_file(source)  # a bad file fails before Ray starts
    ensure_ray(args.address, num_workers=args.actors, cpus_per_worker=1.0, use_gpu=False)
    count = predict_file(uri, ref.name, str(version), source, target, actors=args.actors,
                         batch_size=args.batch_size, model_config=model_config)
    _shutdown_ray()
    print(f"{count} answers from models:/{ref.name}/{version}", file=sys.stderr)
    print(target)


def _cmd_submit(args: argparse.Namespace) -> None:
    from sapt.cluster import jobs
    from sapt.config import load_config

    run = load_config(args.config, args.set)  # a bad config fails here, not minutes later on the cluster
    job_args = ["--config-json", run.model_dump_json(), *(["--resume"] if args.resume else [])]
    job_id = jobs.submit(args.address, jobs.entrypoint("run_sequence", job_args), submission_id=args.job_id,
                         env_vars=jobs.env_for_job(), num_gpus=args.driver_gpus,
                         metadata={"sapt.method": run.method, "sapt.config": args.config})
    print(f"submitted; follow with: sapt logs {job_id} --follow --address {args.address}", file=sys.stderr)
    print(job_id)


def _cmd_status(args: argparse.Namespace) -> None:
    from sapt.cluster import jobs

    print(jobs.status(args.address, args.job_id))


def _cmd_logs(args: argparse.Namespace) -> None:
    from sapt.cluster import jobs

    for chunk in jobs.logs(args.address, args.job_id, follow=args.follow):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _cmd_stop(args: argparse.Namespace) -> None:
    from sapt.cluster import jobs

    print(jobs.stop(args.address, args.job_id))


def _ray_connected() -> bool:
    ray = sys.modules.get("ray")  # not imported: not connected (and importing it would only cost time)
    return ray is not None and ray.is_initialized()


def _shutdown_ray() -> None:
    if "ray" not in sys.modules:  # nothing here started Ray: importing it would only cost time
        return
    from sapt.cluster.session import shutdown_ray

    shutdown_ray()


def _default_address() -> str:
    address = os.environ.get("RAY_ADDRESS", "")
    return address if address.startswith(("http://", "https://")) else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sapt", description="Continual learning of LLMs with SAPT on Ray.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run a continual-learning sequence")
    run.add_argument("config", help="a YAML file or a preset name (e.g. demo)")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key; the value is YAML (order=[sst2,rte])")
    run.add_argument("--resume", action="store_true",
                     help="continue the newest interrupted run of this pool after its last registered task")
    run.add_argument("--verbose", action="store_true",
                     help="also show Ray's, DeepSpeed's and the workers' own output (always in OUTPUT_DIR/logs/)")
    run.set_defaults(handler=_cmd_run)

    zero_shot = commands.add_parser("zero-shot", help="score the bare backbone on every task of the order "
                                    "(no training: the zero-shot reference row)")
    zero_shot.add_argument("config", help="as for `sapt run`: the order, caps, seed and backbone are read from it")
    zero_shot.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for `sapt run`")
    zero_shot.add_argument("--actors", type=int, default=1, help="backbone replicas (Ray Data actors)")
    zero_shot.add_argument("--verbose", action="store_true", help="as for `sapt run`")
    zero_shot.set_defaults(handler=_cmd_zero_shot)

    registry = commands.add_parser("registry", help="adapter pools in the MLflow model registry")
    actions = registry.add_subparsers(dest="action", required=True)
    uri_help = "MLflow tracking URI (default: $MLFLOW_TRACKING_URI), e.g. sqlite:///runs/demo-sapt/mlflow.db"
    listing = actions.add_parser("list", help="every pool, blocks and state model, with versions and aliases")
    listing.set_defaults(handler=_cmd_registry_list)
    showing = actions.add_parser("show", help="a model's versions, or one version (NAME/VERSION, NAME@ALIAS)")
    showing.add_argument("model", help="[models:/]NAME, NAME/VERSION or NAME@ALIAS")
    showing.set_defaults(handler=_cmd_registry_show)
    promoting = actions.add_parser("promote", help="point an alias (e.g. champion) at a version")
    promoting.add_argument("model", help="NAME/VERSION or NAME@ALIAS (e.g. sapt-lora-embedded@after-t04)")
    promoting.add_argument("alias")
    promoting.set_defaults(handler=_cmd_registry_promote)
    for sub in (listing, showing, promoting):
        sub.add_argument("--tracking-uri", default="", help=uri_help)

    predict = commands.add_parser("predict", help="answer prompts with a registered pool (no task ids)")
    predict.add_argument("model", help="models:/NAME/VERSION or models:/NAME@ALIAS")
    given = predict.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", help="one prompt, template applied as in training")
    given.add_argument("--file", help='JSONL, one {"input": ...} per line (other fields are kept)')
    predict.add_argument("--output", help="JSONL answers (default: FILE.predictions.jsonl beside the input)")
    predict.add_argument("--tracking-uri", default="", help=uri_help)
    predict.add_argument("--address", default="", help="Ray cluster for --file (default: a local Ray)")
    predict.add_argument("--actors", type=int, default=1, help="pool replicas (Ray Data actors) for --file")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.add_argument("--device", default="", help="cpu or cuda (default: cuda when available)")
    predict.set_defaults(handler=_cmd_predict)

    from sapt.tuning.cli import add_sweep_command

    add_sweep_command(commands)

    address_help = "the cluster's dashboard, http://HEAD:8265 (default: $RAY_ADDRESS when it is an http URL)"
    submit = commands.add_parser("submit", help="run a sequence on a Ray cluster as a Ray job; prints the job id")
    submit.add_argument("config", help="a YAML file or a preset name, read here and sent whole")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="as for `sapt run`")
    submit.add_argument("--resume", action="store_true", help="as for `sapt run`")
    submit.add_argument("--job-id", default=None, help="a submission id of your choice (default: Ray's)")
    submit.add_argument("--driver-gpus", type=float, default=0, help="GPUs for the job's driver (default 0)")
    submit.set_defaults(handler=_cmd_submit)
    status = commands.add_parser("status", help="a job's status: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED")
    status.set_defaults(handler=_cmd_status)
    logs = commands.add_parser("logs", help="a job's output")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends")
    logs.set_defaults(handler=_cmd_logs)
    stop = commands.add_parser("stop", help="stop a job; prints its status once stopped")
    stop.set_defaults(handler=_cmd_stop)
    for sub in (status, logs, stop):
        sub.add_argument("job_id")
    for sub in (submit, status, logs, stop):
        sub.add_argument("--address", default=_default_address(), help=address_help)
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
