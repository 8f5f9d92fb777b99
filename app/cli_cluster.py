"""`layton cluster up|down|status` and `layton jobs status|logs|stop` (wired into app.cli); like the
other commands, each imports what it runs inside its function (no Ray for `--help`)."""

from __future__ import annotations

import os
import sys
from datetime import datetime


def _cluster_up(args) -> None:
    from app.cluster import cluster_status, cluster_up

    r = cluster_up(port=args.port, dashboard_port=args.dashboard_port, metrics_export_port=args.metrics_export_port,
                   num_cpus=args.num_cpus, num_gpus=args.num_gpus)
    print(f"address:   {r['address']}")
    print(f"dashboard: {r['dashboard_url']}")
    print(f"metrics:   {r['metrics_url']}")
    print(f"export RAY_API_SERVER_ADDRESS={r['dashboard_url']}  # for layton workflow submit / layton jobs")
    env = (cluster_status() or {}).get("driver_env")
    if env:
        print("drivers outside Ray Jobs: " + " ".join(f"{k}={v}" for k, v in env.items()) + " python ...")


def _cluster_down(args) -> None:
    from app.cluster import cluster_down, cluster_status

    state = cluster_status()
    if cluster_down():  # False: it printed that none is recorded
        print(f"stopped the Ray head at {state['address']}")


def _cluster_status(args) -> None:
    from app.cluster import cluster_status, state_path

    state = cluster_status()
    if state is None:
        print(f"no Ray head recorded in {state_path()}")
        return
    print(f"{'up' if state['alive'] else 'DOWN (stale record)'}: {state['address']}")
    for key in ("dashboard_url", "metrics_url", "temp_dir", "started", "num_cpus", "num_gpus"):
        print(f"  {key}: {state.get(key)}")


def resolve_address(address: str | None) -> str:
    """--address, else $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS (Ray's own order), else the recorded local
    head's dashboard. A GCS address of the recorded head (host:port) maps to its dashboard URL."""
    from app.cluster import cluster_status

    state = cluster_status()
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if state and (not address or address == state["address"]):
        return state["dashboard_url"]
    if not address:
        raise ValueError("no Ray cluster: pass --address http://HOST:8265, set RAY_ADDRESS, or `layton cluster up`")
    return address


def _ms(t: int | None) -> str:
    return "-" if t is None else datetime.fromtimestamp(t / 1000).isoformat(sep=" ", timespec="seconds")


def _jobs_status(args) -> None:
    from app.jobs import job_status

    s = job_status(resolve_address(args.address), args.id)
    print(f"{s['submission_id']}: {s['status']}")
    print(f"  workflow:   {s['metadata'].get('layton_workflow', '-')}")
    print(f"  message:    {s['message']}")
    print(f"  entrypoint: {s['entrypoint']}")
    print(f"  started:    {_ms(s['start_time'])}")
    print(f"  ended:      {_ms(s['end_time'])}")
    if s["driver_exit_code"] is not None:
        print(f"  exit code:  {s['driver_exit_code']}")


def _jobs_logs(args) -> None:
    from app.jobs import job_logs

    logs = job_logs(resolve_address(args.address), args.id, follow=args.follow)
    if isinstance(logs, str):
        print(logs, end="")
        return
    for chunk in logs:
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _jobs_stop(args) -> None:
    from app.jobs import stop_job

    stopped = stop_job(resolve_address(args.address), args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'not running'}")


def add_cluster_commands(subparsers) -> None:
    """Add `cluster` and `jobs` to the `layton` subcommands."""
    cluster = subparsers.add_parser("cluster", help="a local Ray head (127.0.0.1 only)").add_subparsers(
        dest="what", required=True)
    up = cluster.add_parser("up", help="start a local Ray head with dashboard and Prometheus metrics")
    up.add_argument("--port", type=int, default=6379, help="GCS port")
    up.add_argument("--dashboard-port", type=int, default=8265)
    up.add_argument("--metrics-export-port", type=int, default=8080)
    up.add_argument("--num-cpus", type=int, default=None)
    up.add_argument("--num-gpus", type=int, default=None)
    up.set_defaults(fn=_cluster_up)
    cluster.add_parser("down", help="stop the head `cluster up` started (only that one)").set_defaults(fn=_cluster_down)
    cluster.add_parser("status", help="the recorded head and whether it runs").set_defaults(fn=_cluster_status)

    jobs = subparsers.add_parser("jobs", help="Ray Jobs on a cluster").add_subparsers(dest="what", required=True)
    addr_help = "dashboard URL (default: $RAY_ADDRESS, else the head `cluster up` started)"
    for name, fn, help_ in (("status", _jobs_status, "a job's status"), ("logs", _jobs_logs, "a job's logs"),
                            ("stop", _jobs_stop, "stop a job")):
        p = jobs.add_parser(name, help=help_)
        p.add_argument("id", help="submission id (layton-<workflow>-<time>)")
        p.add_argument("--address", default=None, help=addr_help)
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
        p.set_defaults(fn=fn)
