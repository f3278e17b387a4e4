"""The ``difyq`` command line (docs/cli.md)."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from difyq.worker import otel
from difyq.worker.config import ConfigError, load_config
from difyq.worker.jobs.schema import FINAL_STATUSES, JobStatus
from difyq.worker.logs import configure_logging
from difyq.worker.redis_check import EXIT_UNUSABLE_REDIS
from difyq.worker.runtime import Runtime, current_runtime, redis_url_from_env


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, ensure_ascii=False))


def _runtime(keep: bool = True) -> Runtime:
    """The runtime from DIFYQ_CONFIG and REDIS_URL (kept as this process's unless ``keep`` is false); a config
    that cannot be used exits 2 with every problem listed."""
    try:
        return current_runtime() if keep else Runtime(load_config(), redis_url_from_env())
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        raise SystemExit(2) from None


def _check_redis(runtime: Runtime) -> None:
    """Refuse to start on an evicting Redis, warn about one without AOF (see worker.redis_check)."""
    from difyq.worker.redis_check import enforce_redis_settings

    enforce_redis_settings(runtime.connector)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 1
    print(f"ok: {len(config.apps)} app(s), {len(config.clients)} client(s), {len(config.hooks)} hook(s), "
          f"{len(config.schedules)} schedule(s)")
    if not args.remote:
        return 0
    from difyq.producers.remote_check import check_remote

    report = check_remote(config)
    for note in report.notes:
        print(note)
    for problem in report.problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if report.problems else 0


def cmd_api(args: argparse.Namespace) -> int:
    import importlib.util

    import structlog
    import uvicorn

    from difyq.producers.api.app import create_app

    configure_logging("api")
    runtime = _runtime()
    _check_redis(runtime)
    # uvloop and httptools when installed (less CPU and latency per request than asyncio and h11), else those;
    # named rather than left to uvicorn's "auto" so the start log says which run.
    server = {"loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
              "http": "httptools" if importlib.util.find_spec("httptools") else "h11"}
    structlog.get_logger("difyq.api").info("api_server", **server)
    uvicorn.run(create_app(runtime), host=args.host, port=args.port, log_config=None, access_log=False, **server)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from difyq.producers.worker_command import exec_worker

    # Loading the config loads the metrics, which write to PROMETHEUS_MULTIPROC_DIR when it is set: it must exist
    # (exec_worker's claim of the directory then removes what this process wrote there).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        Path(os.environ["PROMETHEUS_MULTIPROC_DIR"]).mkdir(parents=True, exist_ok=True)
    _check_redis(_runtime(keep=False))  # this process becomes Dramatiq's master, whose workers make their own
    return exec_worker(processes=args.processes, threads=args.threads, gevent=args.gevent)


def cmd_scheduler(_args: argparse.Namespace) -> int:
    from difyq.producers.scheduler_command import run_scheduler_process

    configure_logging("scheduler")
    runtime = _runtime()
    _check_redis(runtime)
    return run_scheduler_process(runtime)


def _flag(field: str) -> str:
    """The ``enqueue`` option that set a job field: ``user`` → ``--user``, ``inputs.text`` → ``--input text``."""
    top, _, rest = field.partition(".")
    if top == "inputs" and rest:
        return f"--input {rest}"
    if top.startswith("files"):
        return "--file"
    return "--" + top.replace("_", "-")


def _enqueued_file(runtime: Runtime, app: str, user: str | None, thread: str | None, item: str,
                   ) -> dict[str, str] | None:
    """The file object of one ``--file``: an http(s) URL as it is, a local file uploaded to the app's Dify now
    (None, with the reason printed, when it cannot be)."""
    from difyq.producers.file_upload import upload_to_dify, uploader
    from difyq.worker.dify.errors import DifyError

    if re.match(r"https?://", item):
        return {"url": item}
    path = Path(item)
    if not path.is_file():
        print(f"--file {item!r}: neither an http(s) URL nor a file", file=sys.stderr)
        return None
    if app not in runtime.config.apps:
        print(f"--app: no app named {app!r} is configured", file=sys.stderr)
        return None
    try:
        return upload_to_dify(runtime, app, uploader(runtime, app, user, thread), path.name, path.read_bytes())
    except DifyError as exc:
        print(f"--file {item!r}: Dify did not take the upload: {exc}", file=sys.stderr)
        return None


def _priority(value: str) -> int | str:
    """``--priority`` as the submission takes it: a level name, or an integer."""
    return int(value) if value.lstrip("-").isdigit() else value


def cmd_enqueue(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from difyq.producers.api.errors import field_path
    from difyq.producers.submission import JobSubmission
    from difyq.producers.submit import SubmitRejected, submit
    from difyq.worker.jobs.store import IdempotencyConflict

    runtime = _runtime()
    inputs: dict[str, str] = {}
    for item in args.input:
        key, sep, value = item.partition("=")
        if not sep or not key:
            print(f"--input {item!r}: expected key=value", file=sys.stderr)
            return 2
        inputs[key] = value
    files: list[dict[str, str]] = []
    for item in args.file:
        file = _enqueued_file(runtime, args.app, args.user, args.thread, item)
        if file is None:
            return 2
        files.append(file)
    try:
        outcome = submit(
            runtime,
            JobSubmission(app=args.app, query=args.query, inputs=inputs, user=args.user, thread=args.thread,
                          files=files or None, callback_url=args.callback_url,
                          idempotency_key=args.idempotency_key, priority=_priority(args.priority),
                          tenant=args.tenant),
            source="cli", scope="cli",
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        print(f"{_flag(field_path(first['loc']))}: {first['msg']}", file=sys.stderr)
        return 2
    except SubmitRejected as exc:
        print(f"{_flag(exc.field or 'app')}: {exc.message}", file=sys.stderr)
        return 2
    except IdempotencyConflict as exc:
        print(f"{_flag('idempotency_key')}: {exc}", file=sys.stderr)
        return 2
    job = outcome.job
    if not args.wait:
        _print_json(job)
        return 0
    deadline = time.monotonic() + args.timeout
    while job["status"] not in FINAL_STATUSES and time.monotonic() < deadline:
        time.sleep(0.2)
        job = runtime.store.get(job["id"]) or job
    _print_json(job)
    return 0 if job["status"] == JobStatus.SUCCEEDED else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    runtime = _runtime()
    if args.jobs_command == "show":
        job = runtime.store.get(args.id)
        if job is None:
            print(f"no job {args.id}", file=sys.stderr)
            return 1
        _print_json(job)
        return 0
    if args.jobs_command == "list":
        jobs, cursor = runtime.store.list(allowed_apps=None, status=args.status, app=args.app,
                                            tenant=args.tenant, limit=args.limit)
        _print_json({"jobs": jobs, "next_cursor": cursor})
        return 0
    state = runtime.store.rerun(args.id)
    print(f"{args.id}: {state}")
    return 0 if state == JobStatus.QUEUED else 1


def cmd_dlq(args: argparse.Namespace) -> int:
    from difyq.worker.dead_letters import DeadLetters

    letters = DeadLetters(_runtime())
    if args.dlq_command == "list":
        _print_json(letters.list())
        return 0
    if not args.all and not args.id:
        print("dlq replay: give a job id or --all", file=sys.stderr)
        return 2
    replayed = letters.replay(None if args.all else args.id)
    _print_json({"replayed": replayed})
    return 0 if replayed else 1


def cmd_budgets(args: argparse.Namespace) -> int:
    from difyq.worker.budgets import BudgetLedger, configured_budgets
    from difyq.worker.budgets.report import budget_report

    runtime = _runtime()
    report = budget_report(BudgetLedger(runtime.redis, runtime.namespace), configured_budgets(runtime.config),
                           time.time(), lambda _budget, _subject: True)
    _print_json(report.model_dump())
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    from difyq.worker.dify.emulator import default_apps, load_apps, serve

    apps = load_apps(args.apps) if args.apps else default_apps()
    for app in apps:
        if args.ttft is not None:
            app.time_to_first_token_s = args.ttft
        if args.tokens_per_second is not None:
            app.tokens_per_second = args.tokens_per_second
        if args.answer_tokens is not None:
            app.answer_tokens = args.answer_tokens
    serve(args.host, args.port, apps, args.dify_version)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    from difyq.producers.dev import run_dev

    return run_dev(api_port=args.port, emulator_port=args.emulator_port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difyq", description="Queue-driven background workers for Dify apps.")
    commands = parser.add_subparsers(dest="command", required=True)

    dev = commands.add_parser("dev", help="everything on one machine: Redis, API, worker, scheduler, emulator")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--emulator-port", type=int, default=5001)
    dev.set_defaults(func=cmd_dev)

    api = commands.add_parser("api", help="the HTTP producer")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8080)
    api.set_defaults(func=cmd_api)

    worker = commands.add_parser("worker", help="the Dramatiq worker")
    worker.add_argument("--processes", type=int, default=1)
    worker.add_argument("--threads", type=int, default=8)
    worker.add_argument("--gevent", action="store_true", help="greenlets instead of threads (high concurrency)")
    worker.set_defaults(func=cmd_worker)

    scheduler = commands.add_parser("scheduler", help="the cron producer (safe to run several replicas)")
    scheduler.set_defaults(func=cmd_scheduler)

    enqueue = commands.add_parser("enqueue", help="submit one job from a shell")
    enqueue.add_argument("--app", required=True)
    enqueue.add_argument("--query")
    enqueue.add_argument("--input", action="append", default=[], metavar="KEY=VALUE")
    enqueue.add_argument("--user")
    enqueue.add_argument("--thread", help="continue the app's conversation thread of this name (its jobs run one "
                                          "at a time, in submit order)")
    enqueue.add_argument("--file", action="append", default=[], metavar="URL|PATH",
                         help="a file by URL, or a local file uploaded to Dify now (repeatable); its type follows "
                              "the name's extension")
    enqueue.add_argument("--callback-url")
    enqueue.add_argument("--idempotency-key")
    enqueue.add_argument("--priority", default="normal", help="high, normal, low or an integer from -10 to 10")
    enqueue.add_argument("--tenant", help="whose job it is (fair shares, tenant limits); default: cli")
    enqueue.add_argument("--wait", action="store_true", help="wait for the job to end and print it")
    enqueue.add_argument("--timeout", type=float, default=600.0)
    enqueue.set_defaults(func=cmd_enqueue)

    jobs = commands.add_parser("jobs", help="inspect and re-run jobs")
    jobs_commands = jobs.add_subparsers(dest="jobs_command", required=True)
    show = jobs_commands.add_parser("show")
    show.add_argument("id")
    listing = jobs_commands.add_parser("list")
    listing.add_argument("--status", choices=[status.value for status in JobStatus])
    listing.add_argument("--app")
    listing.add_argument("--tenant")
    listing.add_argument("--limit", type=int, default=20)
    retry = jobs_commands.add_parser("retry", help="run a failed or canceled job again")
    retry.add_argument("id")
    jobs.set_defaults(func=cmd_jobs)

    dlq = commands.add_parser("dlq", help="dead letters: failed callbacks and dead-lettered jobs")
    dlq_commands = dlq.add_subparsers(dest="dlq_command", required=True)
    dlq_commands.add_parser("list")
    replay = dlq_commands.add_parser("replay")
    replay.add_argument("id", nargs="?")
    replay.add_argument("--all", action="store_true")
    dlq.set_defaults(func=cmd_dlq)

    budgets = commands.add_parser("budgets", help="each spend budget's figures in its current period")
    budgets.set_defaults(func=cmd_budgets)

    emulator = commands.add_parser("emulator", help="the Dify-compatible emulator")
    emulator.add_argument("--host", default="127.0.0.1")
    emulator.add_argument("--port", type=int, default=5001)
    emulator.add_argument("--apps", help="YAML/JSON file of emulated apps (default: one demo app per mode)")
    emulator.add_argument("--ttft", type=float, help="time to first token, seconds")
    emulator.add_argument("--tokens-per-second", type=float)
    emulator.add_argument("--answer-tokens", type=int)
    emulator.add_argument("--dify-version", choices=["0.15", "1.x"], default="0.15",
                          help="the Dify whose wire shapes to speak (default 0.15: 0.15.8; 1.x: 1.14.2)")
    emulator.set_defaults(func=cmd_emulator)

    check = commands.add_parser("check-config", help="validate the config and list every problem")
    check.add_argument("--config", help="path (default $DIFYQ_CONFIG or ./difyq.yaml)")
    check.add_argument("--remote", action="store_true",
                       help="also ask each app's Dify (/info, /parameters): key, mode, required inputs, file limits")
    check.set_defaults(func=cmd_check_config)
    return parser


# Commands whose own process sends no spans: the worker execs Dramatiq (whose processes set up their own, in
# difyq.worker.actors), dev runs the others as processes, and the emulator and check-config trace nothing.
UNTRACED_COMMANDS = frozenset({"worker", "dev", "emulator", "check-config"})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.command)
    if args.command not in UNTRACED_COMMANDS:
        otel.configure(args.command)
    try:
        return int(args.func(args) or 0)
    except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
        print(f"difyq {args.command}: Redis is unreachable: {exc}", file=sys.stderr)
        return EXIT_UNUSABLE_REDIS


if __name__ == "__main__":
    sys.exit(main())
