"""Ray Jobs: submitting the entrypoints in ``jobs/`` to a cluster with the project as its runtime
environment, and following them (status, logs, stop).

Token authentication: with ``RAY_AUTH_MODE=token`` in the environment, Ray's job client sends the
token from ``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (docs: platform/README.md).
"""

from __future__ import annotations

import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from sapt.errors import SaptError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never shipped with a job: environments, local results, caches (on top of .gitignore, which Ray honours).
EXCLUDES = [".venv", "runs", ".git", "*.egg-info", "__pycache__", ".pytest_cache", "mlruns", "mlartifacts",
            "mlflow.db"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
AGENT_WAIT_S = 90


def _client(address: str):
    """A job client on the dashboard at ``address`` (``http://HOST:8265``), failing in seconds.

    Raises:
        SaptError: (``--address``) a malformed or unreachable address, or a refused token.
    """
    import socket

    from ray.job_submission import JobSubmissionClient

    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise SaptError(f"expected the dashboard URL http://HOST:8265, got {address!r}", source="--address")
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 8265), timeout=5):
            pass
    except OSError as err:
        raise SaptError(f"cannot reach the Ray dashboard at {address}: {err.strerror or err}",
                        source="--address") from None
    try:
        return JobSubmissionClient(address)
    except Exception as err:  # the SDK raises ConnectionError/RuntimeError with the HTTP status inside
        raise _explained(err, address) from None


def _explained(err: Exception, address: str) -> SaptError:
    text = str(err)
    if "401" in text or "403" in text or "nauthorized" in text or "token" in text.lower():
        return SaptError(f"the Ray cluster at {address} refused the request: it uses token authentication; set "
                         "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or ~/.ray/auth_token) to its token",
                         source="--address")
    return SaptError(f"Ray job request to {address} failed: {text.splitlines()[0] if text else type(err).__name__}",
                     source="--address")


def runtime_env(env_vars: dict[str, str] | None = None) -> dict:
    """The project as the job's working directory (so jobs run this checkout's code), or, for an
    installed package without its source tree, the ``sapt`` package alone."""
    # No keys that the job's own ray.init sets (session.WORKER_ENV): Ray refuses to merge the same key twice.
    env = {"env_vars": dict(env_vars or {})}
    if (PROJECT_ROOT / "pyproject.toml").is_file() and (PROJECT_ROOT / "jobs").is_dir():
        env.update(working_dir=str(PROJECT_ROOT), excludes=list(EXCLUDES))
    else:
        env["py_modules"] = [str(PROJECT_ROOT / "sapt")]
    return env


def entrypoint(job: str, args: list[str]) -> str:
    """The shell command of a ``jobs/`` entrypoint, e.g. ``python -m jobs.run_sequence ...``."""
    return " ".join(["python", "-m", f"jobs.{job}", *(shlex.quote(a) for a in args)])


def submit(address: str, command: str, *, submission_id: str | None = None, env_vars: dict[str, str] | None = None,
           num_gpus: float = 0, metadata: dict[str, str] | None = None) -> str:
    """Submits ``command``; returns the job id. Waits up to ``AGENT_WAIT_S`` for a cluster that has
    just started and has no job agent ready yet."""
    client = _client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return client.submit_job(entrypoint=command, runtime_env=runtime_env(env_vars),
                                     submission_id=submission_id, metadata=metadata or None,
                                     entrypoint_num_gpus=num_gpus or None)
        except Exception as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise _explained(err, address) from None
            time.sleep(2)


def status(address: str, job_id: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    client = _client(address)
    try:
        return str(client.get_job_status(job_id).value)
    except Exception as err:
        raise _not_found_or(err, address, job_id) from None


def logs(address: str, job_id: str, *, follow: bool = False) -> Iterator[str]:
    """The job's output so far, or (``follow``) everything until it ends, as it comes."""
    client = _client(address)
    try:
        if not follow:
            yield client.get_job_logs(job_id)
            return
        import asyncio

        stream = client.tail_job_logs(job_id)
        loop = asyncio.new_event_loop()
        try:
            while True:
                try:
                    yield loop.run_until_complete(stream.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            loop.close()
    except SaptError:
        raise
    except Exception as err:
        raise _not_found_or(err, address, job_id) from None


def stop(address: str, job_id: str, *, wait_s: float = 60) -> str:
    """Asks the job to stop and waits (up to ``wait_s``) until it has; returns its status then."""
    client = _client(address)
    try:
        client.stop_job(job_id)
        deadline = time.monotonic() + wait_s
        while (state := str(client.get_job_status(job_id).value)) not in TERMINAL and time.monotonic() < deadline:
            time.sleep(1)
        return state
    except Exception as err:
        raise _not_found_or(err, address, job_id) from None


def _not_found_or(err: Exception, address: str, job_id: str) -> SaptError:
    if "does not exist" in str(err) or "404" in str(err):
        return SaptError(f"no job {job_id!r} on the cluster at {address}", source="JOB_ID")
    return _explained(err, address)


def env_for_job() -> dict[str, str]:
    """What the submitting shell knows that the job needs too (the MLflow server)."""
    return {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI",) if os.environ.get(k)}
