"""A real two-node Ray cluster with token authentication and a real MLflow server: `sapt submit` sends a
short SAPT sequence through the Jobs API, `sapt status`/`logs` follow it, and the registered pool is
read back from the server. Everything started here is stopped here (by process, never `ray stop`).
"""

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
SETTINGS = [
    "order=[first-word,last-word]", "train.epochs=1", "max_train_per_task=48", "max_eval_per_task=8",
    "val_size=8", "method_args.generator_steps=3", "method_args.generator_max_new_tokens=8",
    "mlflow.pool_name=cluster-pool", "mlflow.experiment=cluster", "output_dir=runs/cluster-job",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, process: subprocess.Popen | None, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if (process is not None and process.poll() not in (None, 0)) or time.monotonic() > deadline:
                raise AssertionError(log.read_text()[-3000:] if log.exists() else f"port {port} never opened")
            time.sleep(0.5)


def _ours(marker: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    temp_dir = Path(tempfile.mkdtemp(prefix="sapt-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    token = secrets.token_hex(32)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    gcs, dashboard, mlflow_port = _free_port(), _free_port(), _free_port()
    mlflow_log = (work / "mlflow.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{work / 'server.db'}", "--artifacts-destination", str(work / "artifacts")],
        stdout=mlflow_log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )
    try:
        def node_ports(name):
            """Two nodes on one host (maybe beside other Ray instances): no default ports, and each its own
            temp dir, else one node's runtime-env agent deletes the job's working dir the other one uses."""
            return ["--temp-dir", str(temp_dir / name), "--disable-usage-stats",
                    *[x for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                     "--metrics-export-port", "--runtime-env-agent-port")
                      for x in (flag, str(_free_port()))]]

        subprocess.run([str(BIN / "ray"), "start", "--head", "--port", str(gcs), "--dashboard-port", str(dashboard),
                        "--dashboard-host", "127.0.0.1", "--include-dashboard", "true", "--num-cpus", "3",
                        *node_ports("head")], env=env, check=True, capture_output=True, timeout=180)
        subprocess.run([str(BIN / "ray"), "start", "--address", f"127.0.0.1:{gcs}", "--num-cpus", "2", *node_ports("node")],
                       env=env, check=True, capture_output=True, timeout=180)
        _wait_for_port(mlflow_port, server, work / "mlflow.log")
        yield {"address": f"http://127.0.0.1:{dashboard}", "mlflow": f"http://127.0.0.1:{mlflow_port}", "env": env,
               "temp_dir": temp_dir, "gcs": gcs}
    finally:
        for p in _ours(str(temp_dir)):  # every process of this cluster, and nothing else
            try:
                p.kill()
            except psutil.Error:
                pass
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=30)
        mlflow_log.close()
        if os.environ.get("SAPT_KEEP_RAY_LOGS") is None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def _sapt(*args, env):
    return subprocess.run([sys.executable, "-m", "sapt.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_both_nodes_joined_the_cluster(cluster):
    import ray

    code = ("import ray; ray.init(address='127.0.0.1:%d', logging_level='ERROR'); "
            "print(len([n for n in ray.nodes() if n['Alive']]))" % cluster["gcs"])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cluster["env"], timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "2", out.stderr[-2000:]
    assert ray  # the client library is what the CLI uses


def test_a_submission_without_the_token_is_refused_with_a_clear_message(cluster):
    env = {k: v for k, v in cluster["env"].items() if k not in ("RAY_AUTH_TOKEN",)}
    env["HOME"] = str(Path(cluster["temp_dir"]) / "no-home")  # no ~/.ray/auth_token either
    out = _sapt("submit", "demo-sapt", "--address", cluster["address"], *[x for s in SETTINGS for x in ("--set", s)],
                env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "token" in out.stderr and "Traceback" not in out.stderr


def test_a_submitted_sequence_runs_on_the_cluster_and_registers_its_pool(cluster):
    env, address = cluster["env"], cluster["address"]
    sets = [x for s in [*SETTINGS, f"mlflow.tracking_uri={cluster['mlflow']}"] for x in ("--set", s)]
    submitted = _sapt("submit", "demo-sapt", "--address", address, *sets, env=env)
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip().splitlines()[-1]
    deadline, state = time.monotonic() + 900, "PENDING"
    while time.monotonic() < deadline:
        state = _sapt("status", job_id, "--address", address, env=env).stdout.strip().splitlines()[-1]
        if state in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(5)
    logs = _sapt("logs", job_id, "--address", address, env=env).stdout
    assert state == "SUCCEEDED", logs[-4000:]
    assert "registered cluster-pool version 2" in logs and logs.strip().splitlines()[-1].endswith("results.json")

    client = MlflowClient(cluster["mlflow"])
    aliases = {alias: int(v) for alias, v in client.get_registered_model("cluster-pool").aliases.items()}
    assert aliases == {"after-t01": 1, "after-t02": 2, "newest": 2}
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    [run] = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]  # the sequence; the rest are its tasks
    assert len(runs) == 3
    assert run.info.status == "FINISHED" and "AP" in run.data.metrics
    version = client.get_model_version("cluster-pool", "2")
    assert version.tags["source_run_id"] == run.info.run_id and json.loads(version.tags["block_versions"]) == [1, 2]
    unknown = _sapt("status", "no-such-job", "--address", address, env=env)
    assert unknown.returncode == 2 and "no-such-job" in unknown.stderr
