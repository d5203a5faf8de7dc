"""The deployment files (ray_cluster.yaml, platform/) parse and keep the facts platform/README.md relies on.

Offline and fast: YAML and Dockerfile text, Ray's own launcher schema, no Docker or Kubernetes.
"""

import copy
import fnmatch
import json
import re
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
LAUNCHER = ROOT / "ray_cluster.yaml"
YAML_FILES = sorted([LAUNCHER, *PLATFORM.rglob("*.yaml"), *PLATFORM.rglob("*.yml")])

# Field names of the KubeRay ray.io/v1 Go API types (raycluster_types.go, rayjob_types.go) that a
# manifest may use; a typo there is silently dropped by some tools and rejected by others.
RAYCLUSTER_SPEC_FIELDS = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "historyServerOptions", "networkPolicy",
    "tlsOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
HEAD_GROUP_FIELDS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_FIELDS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                       "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
AUTH_OPTIONS_FIELDS = {"mode", "secretName", "enableK8sTokenAuth"}
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend",
}


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(path: Path, kind: str, name: str | None = None) -> dict:
    found = [d for d in _docs(path) if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{path.name}: expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pin(text: str, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", text, re.MULTILINE | re.IGNORECASE)
    assert match, f"no {package}== pin"
    return match.group(1)


CONSTRAINTS = (ROOT / "constraints.txt").read_text()
RAY_VERSION = _pin(CONSTRAINTS, "ray")
TORCH_VERSION = _pin(CONSTRAINTS, "torch")
MLFLOW_VERSION = _pin(CONSTRAINTS, "mlflow")


def _server_args(argv: list[str]) -> dict[str, str]:
    """`mlflow server` options as {flag: value} from an argument list (``--k=v``, ``--k v``, ``--flag``)."""
    assert argv[0] == "server", argv
    options, i = {}, 1
    while i < len(argv):
        flag, _, value = argv[i].partition("=")
        if not value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        options[flag] = value
        i += 1
    return options


def _assert_proxied_database_server(options: dict[str, str], where: str) -> None:
    assert re.match(r"(postgresql|sqlite)(\+\w+)?://", options.get("--backend-store-uri", "")), where
    assert "--serve-artifacts" in options and "--no-serve-artifacts" not in options, where
    assert options.get("--artifacts-destination"), where
    assert options.get("--port", "5000") == "5000", where


# ---------------------------------------------------------------- every file


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_yaml_parses(path):
    assert _docs(path), f"{path} holds no YAML document"


def test_expected_files_exist():
    names = {str(p.relative_to(ROOT)) for p in YAML_FILES}
    assert {"ray_cluster.yaml", "platform/kuberay/raycluster.yaml", "platform/kuberay/rayjob.yaml",
            "platform/mlflow/docker-compose.yaml", "platform/mlflow/k8s.yaml"} <= names
    assert (PLATFORM / "Dockerfile").is_file() and (PLATFORM / "README.md").is_file()


def test_platform_holds_no_python_and_does_not_shadow_stdlib():
    assert not [p for p in PLATFORM.rglob("*") if p.suffix in {".py", ".pyc", ".pyi", ".so"}]
    assert not list(PLATFORM.rglob("__init__.py"))
    # Ray puts a job's working directory first on PYTHONPATH: `platform` must still be the stdlib's.
    out = subprocess.run([sys.executable, "-c", "import platform; print(platform.__file__)"],
                         capture_output=True, text=True, check=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT)})
    assert Path(out.stdout.strip()).parent == Path(sysconfig.get_paths()["stdlib"])


def test_no_secret_values_committed():
    for path in YAML_FILES:
        for doc in _docs(path):
            if doc.get("kind") == "Secret":
                assert not doc.get("data") and not doc.get("stringData"), f"{path}: a Secret with values"


# ---------------------------------------------------------------- ray_cluster.yaml (ray up)


@pytest.fixture(scope="module")
def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_matches_ray_schema(launcher):
    import ray.autoscaler

    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(launcher, schema)
    typo = dict(launcher, setup_command=launcher["setup_commands"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(typo, schema)


def test_launcher_passes_ray_up_config_checks(launcher):
    """What `ray up` does to the file before it calls the cloud: fill defaults, merge commands, validate."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(copy.deepcopy(launcher))
    util.validate_config(prepared)


def test_launcher_head_has_no_gpu_and_a_worker_type_has_gpus(launcher):
    types = launcher["available_node_types"]
    head = types[launcher["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != launcher["head_node_type"]
                 and t["resources"].get("GPU", 0) >= 1 and t.get("max_workers", 1) > 0]
    assert gpu_types
    docker = launcher.get("docker", {})
    if docker:
        assert docker["head_image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311")
        assert docker["worker_image"].startswith(f"rayproject/ray:{RAY_VERSION}-py311-gpu")


def _install_order(commands: list[str], project_dir: str) -> None:
    torch = [i for i, c in enumerate(commands) if "pip install" in c and f"torch=={TORCH_VERSION}" in c]
    project = [i for i, c in enumerate(commands) if re.search(r"pip install\b.*\s(-e\s+)?\.(\[[\w,]+\])?(\s|$)", c)]
    assert torch and project, commands
    assert torch[0] < project[0], "torch must be installed before the project"
    for i in (torch[0], project[0]):
        assert "-c constraints.txt" in commands[i] and f"cd {project_dir}" in commands[i], commands[i]


def test_launcher_setup_installs_torch_first_with_constraints(launcher):
    project_dir = next(remote for remote, local in launcher["file_mounts"].items() if local == ".")
    setup = launcher.get("setup_commands", [])
    _install_order(setup + launcher.get("head_setup_commands", []), project_dir)
    for name, node_type in launcher["available_node_types"].items():
        if name != launcher["head_node_type"]:
            # A node type's own worker_setup_commands replace the global ones.
            _install_order(node_type.get("worker_setup_commands", setup + launcher.get("worker_setup_commands", [])),
                           project_dir)


def test_launcher_starts_ray_with_token_auth(launcher):
    starts = [c for c in launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
              if "ray start" in c]
    assert any("--head" in c for c in starts) and any("--address=" in c for c in starts)
    for command in starts:
        assert set(re.findall(r"RAY_AUTH_MODE=(\w+)", command)) == {"token"}, command
        token_dir = re.search(r"RAY_AUTH_TOKEN_PATH=\$HOME/([^/\s;]+)/", command)
        assert token_dir, command
        assert f"~/{token_dir.group(1)}" in launcher["file_mounts"], "the token folder is not synced to the nodes"


def test_launcher_head_runs_mlflow(launcher):
    command = next(c for c in launcher["head_start_ray_commands"] if "mlflow server" in c)
    argv = shlex.split(command.split("mlflow server", 1)[1].split(">", 1)[0])
    _assert_proxied_database_server(_server_args(["server", *argv]), "ray_cluster.yaml head")
    assert "--host 0.0.0.0" in command


# ---------------------------------------------------------------- platform/Dockerfile


def test_dockerfile_installs_torch_first_with_constraints():
    text = (PLATFORM / "Dockerfile").read_text()
    assert re.search(rf"^ARG RAY_IMAGE=rayproject/ray:{re.escape(RAY_VERSION)}-py311-cpu$", text, re.MULTILINE)
    runs = re.findall(r"^RUN (.*?)(?<!\\)$", text, re.MULTILINE | re.DOTALL)
    torch = [i for i, r in enumerate(runs) if f"torch=={TORCH_VERSION}" in r]
    project = [i for i, r in enumerate(runs) if re.search(r"-c constraints\.txt (-e )?\.(\s|$)", r)]
    assert torch and project and torch[0] < project[0]
    assert "-c constraints.txt" in runs[torch[0]]
    assert f"torch=={TORCH_VERSION}" in (ROOT / "Makefile").read_text()
    ignore = (PLATFORM / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:] and "!sapt/" in ignore and "!constraints.txt" in ignore


# ---------------------------------------------------------------- KubeRay


def _mlflow_service_uri() -> str:
    service = _one(PLATFORM / "mlflow" / "k8s.yaml", "Service", "mlflow")
    return f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"


def _check_cluster_spec(spec: dict, where: str) -> None:
    assert set(spec) <= RAYCLUSTER_SPEC_FIELDS, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC_FIELDS}"
    assert spec["rayVersion"] == RAY_VERSION, where
    assert set(spec["authOptions"]) <= AUTH_OPTIONS_FIELDS and spec["authOptions"]["mode"] == "token", where
    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_FIELDS, where
    groups = [head, *spec["workerGroupSpecs"]]
    for group in groups:
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), f"{where}: rayStartParams are strings"
    head_container = head["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head_container.get("resources", {}).get("limits", {}), where
    gpu_groups = []
    for group in spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS, f"{where}: unknown fields {set(group) - WORKER_GROUP_FIELDS}"
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        if int(limits.get("nvidia.com/gpu", 0)) >= 1:
            gpu_groups.append(group)
    assert gpu_groups, f"{where}: no GPU worker group"
    uri = _mlflow_service_uri()
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            assert env.get("MLFLOW_TRACKING_URI") == uri, f"{where}: MLFLOW_TRACKING_URI"
            assert container["image"].endswith("-gpu" if group is not head else "-cpu"), container["image"]


def test_raycluster_has_head_and_gpu_workers_with_token_auth():
    cluster = _one(PLATFORM / "kuberay" / "raycluster.yaml", "RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"], "raycluster.yaml")
    assert cluster["spec"]["authOptions"]["secretName"]


def test_rayjob_runs_sapt_on_its_cluster():
    job = _one(PLATFORM / "kuberay" / "rayjob.yaml", "RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, f"unknown fields {set(spec) - RAYJOB_SPEC_FIELDS}"
    _check_cluster_spec(spec["rayClusterSpec"], "rayjob.yaml")
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["sapt", "run"]
    preset = argv[2]
    assert (ROOT / "sapt" / "presets" / f"{preset}.yaml").is_file(), f"no preset {preset}"
    sets = dict(argv[i + 1].split("=", 1) for i, a in enumerate(argv) if a == "--set")
    assert sets["ray.address"] == "auto"
    assert sets["mlflow.tracking_uri"] == _mlflow_service_uri()
    mounts = {m["mountPath"] for c in spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
              for m in c.get("volumeMounts", [])}
    assert any(sets["ray.storage_path"].startswith(m) for m in mounts), "Train checkpoints must be on the shared mount"
    # The cluster can hold the preset's Ray Train workers, one GPU each.
    workers = yaml.safe_load((ROOT / "sapt" / "presets" / f"{preset}.yaml").read_text()).get("num_workers", 1)
    gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                      .get("nvidia.com/gpu", 0)) for g in spec["rayClusterSpec"]["workerGroupSpecs"])
    if sets.get("ray.use_gpu") == "true":
        assert gpus >= workers


# ---------------------------------------------------------------- MLflow server


def test_mlflow_image_matches_client_version():
    text = (PLATFORM / "mlflow" / "Dockerfile").read_text()
    assert f'"mlflow=={MLFLOW_VERSION}"' in text and "psycopg2" in text
    assert re.search(r'^ENTRYPOINT \["mlflow"\]$', text, re.MULTILINE)


def test_compose_runs_mlflow_on_postgres_with_artifact_serving():
    compose = yaml.safe_load((PLATFORM / "mlflow" / "docker-compose.yaml").read_text())
    services = compose["services"]
    mlflow = services["mlflow"]
    assert (PLATFORM / "mlflow" / mlflow["build"] / "Dockerfile").is_file()
    options = _server_args(mlflow["command"])
    _assert_proxied_database_server(options, "docker-compose.yaml")
    db_host = re.search(r"@([^:/]+)[:/]", options["--backend-store-uri"]).group(1)
    assert options["--backend-store-uri"].startswith("postgresql") and db_host in services
    assert any(v.split(":")[1] == options["--artifacts-destination"] for v in mlflow["volumes"])
    assert "5000:5000" in mlflow["ports"]


def test_k8s_runs_mlflow_on_postgres_with_artifact_serving():
    path = PLATFORM / "mlflow" / "k8s.yaml"
    deployment = _one(path, "Deployment", "mlflow")
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    options = _server_args(container["args"])
    _assert_proxied_database_server(options, "k8s.yaml")
    assert options["--backend-store-uri"].startswith("postgresql")
    db_host = re.search(r"@([^:/]+)[:/]", options["--backend-store-uri"]).group(1)
    db_service = _one(path, "Service", db_host)
    db_pods = _one(path, "Deployment", db_host)["spec"]["template"]["metadata"]["labels"]
    assert db_service["spec"]["selector"].items() <= db_pods.items()
    assert options["--artifacts-destination"] in {m["mountPath"] for m in container["volumeMounts"]}
    service = _one(path, "Service", "mlflow")
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert service["spec"]["ports"][0]["port"] == 5000
    # MLflow rejects Host headers it does not list; the Ray pods use the Service name.
    allowed = options["--allowed-hosts"].split(",")
    host = _mlflow_service_uri().split("//")[1]
    assert any(fnmatch.fnmatch(host, pattern) if "*" in pattern else host == pattern for pattern in allowed)
