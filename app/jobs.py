"""Ray Jobs helpers: submit a workflow to a cluster, follow it, stop it.

Addresses are dashboard URLs (http://host:8265), as `layton cluster up` prints them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ENTRYPOINT = "python -m app.cli workflow run --from-env"
# Ray uploads working_dir to the cluster (limit 500 MiB) and applies .gitignore too; these keep
# environments, outputs, weights and caches out of the package even where no .gitignore says so
# (data files such as workflows/data/*.parquet stay: the workflows read them).
DEFAULT_EXCLUDES: tuple[str, ...] = (
    ".venv", "venv", ".git", "/runs", "/.cache", "*.egg-info", "__pycache__", "*.pyc",
    ".pytest_cache", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints",
    "*.safetensors", "*.ckpt", "*.pt", "*.pth",
)
ACTIVE = ("PENDING", "RUNNING")
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PROBE_TIMEOUT_S = 5.0
MAX_WORKFLOW_BYTES = 100_000  # one env var; Linux caps a single one at 128 KiB


class WorkflowAlreadyRunning(RuntimeError):
    def __init__(self, name: str, submission_id: str, status: str):
        super().__init__(f"workflow {name!r} is already {status} as job {submission_id}; "
                         f"`layton jobs stop {submission_id}` to stop it")
        self.name, self.submission_id, self.status = name, submission_id, status


class UnknownJob(ValueError):
    def __init__(self, job_id: str, address: str):
        super().__init__(f"no job {job_id!r} on the Ray cluster at {address}")
        self.job_id = job_id


def _unreachable(address: str, why: object) -> ConnectionError:
    return ConnectionError(f"no Ray dashboard answers at {address} ({why}); start a local head with "
                           "`layton cluster up` or pass the cluster's dashboard URL")


def _local_token_headers(host: str) -> dict:
    """`ray start` turns token auth on when ~/.ray/auth_token (or RAY_AUTH_TOKEN[_PATH]) exists, but
    the Jobs client only sends the token when RAY_AUTH_MODE=token is set in *its* environment. For a
    head on this machine send it anyway; remote clusters keep Ray's own rule (no token leaves the
    machine unless RAY_AUTH_MODE=token says so)."""
    try:
        if not ipaddress.ip_address(host).is_loopback:
            return {}
    except ValueError:
        if host != "localhost":
            return {}
    try:
        from ray._raylet import AuthenticationTokenLoader

        return dict(AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True))
    except Exception:  # no token, or a Ray without token auth: send nothing
        return {}


@contextlib.contextmanager
def _without_env(*names: str):
    """JobSubmissionClient lets RAY_ADDRESS / RAY_API_SERVER_ADDRESS override the address it is given;
    an explicit address must win."""
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str):
    """A JobSubmissionClient for the dashboard at `address`; ConnectionError within seconds when
    nothing answers there (the client itself sets no timeout and would hang on a silent host)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = (address or "").rstrip("/")
    url = urllib.parse.urlsplit(address)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ValueError(f"{address!r}: give the Ray dashboard URL, e.g. http://127.0.0.1:8265")
    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # something HTTP answers (401 with token auth): the client sorts out the rest
    except (OSError, ValueError) as e:  # refused, timeout, reset, not HTTP at all
        raise _unreachable(address, getattr(e, "reason", e)) from None
    try:
        with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
            return JobSubmissionClient(address, headers=_local_token_headers(url.hostname) or None)
    except AuthenticationError as e:
        raise RuntimeError(f"{address}: {e}") from None
    except ConnectionError as e:
        raise _unreachable(address, e) from None


def _job(client, address: str, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "status code 404" in str(e):
            raise UnknownJob(job_id, address) from None
        raise


def submit_workflow(address: str, name: str, workflow_yaml: str, working_dir: str | Path = REPO_ROOT,
                    entrypoint: str = DEFAULT_ENTRYPOINT, excludes: Sequence[str] = DEFAULT_EXCLUDES,
                    env_vars: dict[str, str] | None = None) -> str:
    """Submit workflow `name` as a Ray Job and return its submission id.

    The workflow text travels in the env var LAYTON_WORKFLOW (its paths are already absolute), the
    code as the uploaded `working_dir`. Refuses with WorkflowAlreadyRunning while a job of the same
    workflow is PENDING or RUNNING: two runs would write the same outputs.
    """
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(f"workflow name {name!r}: use letters, digits, '_', '-', '.'")
    if len(workflow_yaml.encode()) > MAX_WORKFLOW_BYTES:
        raise ValueError(f"workflow {name!r} is over {MAX_WORKFLOW_BYTES} bytes; too big for an env var")
    working_dir = Path(working_dir).resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"working_dir {working_dir} is not a directory")
    client = connect(address)
    for job in client.list_jobs():
        if (job.metadata or {}).get("layton_workflow") == name and str(job.status) in ACTIVE:
            raise WorkflowAlreadyRunning(name, job.submission_id, str(job.status))
    # The check and the submit are not atomic; the timestamped id at least makes a second submit in
    # the same second fail loudly (duplicate id) rather than run twice.
    return client.submit_job(
        entrypoint=entrypoint,
        submission_id=f"layton-{name}-{datetime.now():%Y%m%d-%H%M%S}",
        runtime_env={"working_dir": str(working_dir), "excludes": list(excludes),
                     "env_vars": {**(env_vars or {}), "LAYTON_WORKFLOW": workflow_yaml}},
        metadata={"layton_workflow": name},
    )


def job_status(address: str, job_id: str) -> dict:
    job = _job(connect(address), address, job_id)
    return {
        "submission_id": job.submission_id, "job_id": job.job_id, "status": str(job.status),
        "message": job.message, "error_type": job.error_type, "entrypoint": job.entrypoint,
        "metadata": dict(job.metadata or {}),
        "start_time": job.start_time, "end_time": job.end_time,  # ms since the epoch (None: not yet)
        "driver_exit_code": getattr(job, "driver_exit_code", None),
    }


def _follow(client, job_id: str) -> Iterator[str]:
    """tail_job_logs (an async iterator over a websocket) driven from sync code; it ends once the
    job is terminal and the server closes the socket."""
    loop = asyncio.new_event_loop()
    chunks = client.tail_job_logs(job_id)
    try:
        while True:
            try:
                yield loop.run_until_complete(chunks.__anext__())
            except StopAsyncIteration:
                return
    finally:
        loop.run_until_complete(chunks.aclose())
        loop.close()


def job_logs(address: str, job_id: str, follow: bool = False) -> str | Iterator[str]:
    """All logs so far (str), or with `follow` an iterator of chunks until the job ends."""
    client = connect(address)
    _job(client, address, job_id)  # a clear error for an unknown id (the websocket gives none)
    return _follow(client, job_id) if follow else client.get_job_logs(job_id)


def stop_job(address: str, job_id: str) -> bool:
    """Ask the job to stop (SIGTERM, then SIGKILL); False when it was no longer running."""
    client = connect(address)
    _job(client, address, job_id)
    return client.stop_job(job_id)


def wait_for_job(address: str, job_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
    """Poll until the job is SUCCEEDED, FAILED or STOPPED; TimeoutError naming the last status."""
    client = connect(address)
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(_job(client, address, job_id).status)
        if status in TERMINAL:
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f}s")
        time.sleep(poll_s)
