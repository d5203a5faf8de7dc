"""Starting an embedded local Ray, or joining a cluster, with the environment workers need."""

from __future__ import annotations

import logging
import math
import os
import socket
from urllib.parse import urlparse

import ray

from sapt.errors import SaptError

log = logging.getLogger(__name__)

WORKER_ENV = {"TOKENIZERS_PARALLELISM": "false"}


def ensure_ray(address: str, *, num_workers: int, cpus_per_worker: float, use_gpu: bool,
               extra_cpus: float = 0.0) -> None:
    """Connects to ``address``, or starts a local Ray when it is empty; no-op if already connected.

    Inside a Ray job (``sapt submit``) an empty address means the job's own cluster: the job
    supervisor sets ``RAY_ADDRESS``.

    Args:
        num_workers, cpus_per_worker, use_gpu: the workers that run at once (Train workers, or
            Ray Data actors); a local Ray refuses more than this machine's cores or GPUs at once.
        extra_cpus: logical CPUs beyond theirs, for processes that mostly wait (sweep trials' drivers).

    Raises:
        SaptError: an unreachable address, or a local ask beyond the machine (``num_workers``).
    """
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS", "")
    env = dict(WORKER_ENV, DS_ACCELERATOR="cuda" if use_gpu else "cpu")
    if address:
        _probe(address)
        try:
            ray.init(address=address, runtime_env={"env_vars": env}, logging_level=logging.WARNING)
        except Exception as err:  # Ray raises several types for an unreachable cluster
            raise SaptError(f"cannot connect to Ray at {address!r}: {err}", source="ray.address") from None
        return
    check_local_fit(num_workers, cpus_per_worker, use_gpu)
    # Ray Data's read and split tasks need CPUs that the Train workers have not reserved
    # (ecosystem.md 1.3): over-commit logical CPUs on small machines.
    needed = math.ceil(num_workers * cpus_per_worker + extra_cpus) + 2
    num_cpus = max(os.cpu_count() or 1, needed)
    log.info("starting a local Ray with %d logical CPUs", num_cpus)
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            **local_dashboard(),
            runtime_env={"env_vars": env},
            logging_level=logging.WARNING,
            log_to_driver=True,
        )
    except Exception as err:  # Ray gives up on a node that does not come up (an overloaded machine)
        raise SaptError(f"the embedded local Ray did not start: {err} (Ray's own logs: "
                        "/tmp/ray/session_latest/logs)", source="ray.address") from None


def check_local_fit(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """An embedded local Ray has this machine's cores and GPUs and no more: an ask beyond them would
    wait forever (or thrash), so it is refused before anything starts."""
    cores = os.cpu_count() or 1
    if num_workers * cpus_per_worker > cores:
        raise SaptError(f"{num_workers} workers x {cpus_per_worker:g} CPUs need {num_workers * cpus_per_worker:g} "
                        f"cores, and this machine has {cores} (the embedded local Ray; set ray.address to use a "
                        "cluster)", source="config", field="num_workers")
    if use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if num_workers > gpus:
            raise SaptError(f"{num_workers} GPU workers need {num_workers} GPUs, and this machine has {gpus} "
                            "(the embedded local Ray; set ray.address to use a cluster)", source="config",
                            field="ray.use_gpu")


def shutdown_ray() -> None:
    """Disconnects from (or stops the local) Ray if this process is connected; flushes forwarded worker logs."""
    if ray.is_initialized():
        ray.shutdown()


def local_dashboard() -> dict:
    """``ray.init`` options for a local Ray that runs Ray Train: its dashboard on a free loopback port.

    Ray Train V2's placement-group cleaner asks the State API, which the dashboard serves, every
    second whether a stage's controller still lives. Without a dashboard every ask fails: a warning
    on the console each second of each stage, and a dead controller's placement group would never
    be removed. (Wall time on 2 cores: no difference beyond the run-to-run noise.)
    """
    return {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": _free_port()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(address: str, timeout_s: float = 5.0) -> None:
    """Fails in seconds on a closed address; ray.init itself retries for minutes."""
    if address == "auto":
        return
    parsed = urlparse(address if "://" in address else f"gcs://{address}")
    if not parsed.hostname or not parsed.port:
        raise SaptError(f"expected HOST:PORT or ray://HOST:PORT, got {address!r}", source="ray.address")
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=timeout_s):
            pass
    except OSError as err:
        raise SaptError(f"cannot reach Ray at {address!r}: {err.strerror or err}", source="ray.address") from None
