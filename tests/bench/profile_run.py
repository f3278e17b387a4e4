"""Profile difyq under steady open-loop load with py-spy: where the API's and the workers' CPU goes.

    # py-spy comes with the bench extra; it needs ptrace (root, or CAP_SYS_PTRACE)
    .venv/bin/python -m tests.bench.profile_run --rate 100 --seconds 20 --latency-ms 0 --out /tmp/difyq-profile

It starts the same stack as the bench (private Redis, emulator, sink, ``difyq api`` and ``difyq worker``), offers
``rate`` jobs/s for ``seconds``, and records each difyq process tree with ``py-spy record --format raw``
(collapsed stacks; open them in speedscope or flamegraph.pl). It prints, per process kind, the share of CPU
samples by package and the functions with the most inclusive and self time, normalised to CPU ms per job.
"""

from __future__ import annotations

import argparse
import asyncio
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.loadgen import open_loop
from tests.bench.scenarios import warm_up
from tests.bench.stack import REPO_ROOT, Profile, WorkerShape, scratch_bench

_PACKAGES = ("worker/", "producers/", "dramatiq/", "redis/", "requests/", "urllib3/", "structlog/",
             "prometheus_client/", "starlette/", "fastapi/", "uvicorn/", "pydantic", "h11/", "anyio/",
             "standardwebhooks/", "http/", "json/", "socket.py", "ssl.py", "threading.py", "queue.py",
             "logging/", "email/", "uuid.py", "gevent/", "asyncio/", "selectors.py")


def _frame_package(frame: str) -> str:
    for package in _PACKAGES:
        if f"/{package}" in frame or f"({package}" in frame:
            return package.rstrip("/")
    return "other"


@dataclass
class Tally:
    """One py-spy raw file's samples: per frame inclusive and self counts, self counts per package."""

    samples: int = 0
    inclusive: Counter[str] = field(default_factory=Counter)
    own: Counter[str] = field(default_factory=Counter)
    packages: Counter[str] = field(default_factory=Counter)

    def shares(self, top: int = 12) -> dict[str, Any]:
        """The JSON-ready shares (% of samples): by package, and the top frames by self and inclusive time."""
        def percent(counter: Counter[str], limit: int) -> list[tuple[str, float]]:
            return [(name, round(100 * count / self.samples, 1)) for name, count in counter.most_common(limit)]

        return {"samples": self.samples, "self_by_package": percent(self.packages, 14),
                "top_self": percent(self.own, top), "top_inclusive": percent(self.inclusive, top)}


def tally(raw: Path) -> Tally:
    """Count the samples of a ``py-spy record --format raw`` file."""
    counts = Tally()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [frame for frame in stack.split(";") if not frame.startswith(("process ", "thread "))]
        if not frames:
            continue
        counts.samples += count
        for frame in set(frames):
            counts.inclusive[frame] += count
        counts.own[frames[-1]] += count
        counts.packages[_frame_package(frames[-1])] += count
    return counts


def summarize(raw: Path, jobs: int, top: int = 25) -> str:
    """Package shares and the top inclusive/self functions of one py-spy raw file."""
    counts = tally(raw)
    samples = counts.samples
    if not samples:
        return f"{raw.name}: no samples\n"
    return "\n".join([
        f"== {raw.name}: {samples} samples",
        "self time by package (% of samples): " + ", ".join(
            f"{name} {100 * count / samples:.1f}" for name, count in counts.packages.most_common(14)),
        "top inclusive (% of samples):",
        *[f"  {100 * count / samples:5.1f}  {frame}" for frame, count in counts.inclusive.most_common(top)],
        "top self (% of samples):",
        *[f"  {100 * count / samples:5.1f}  {frame}" for frame, count in counts.own.most_common(top)],
        f"(jobs in the window: {jobs})",
        "",
    ])


def wait_until_sampling(recorder: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Wait for a ``py-spy record``'s "Sampling process" line on its output (its errors go there too): it has
    attached and records."""
    assert recorder.stdout is not None
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([recorder.stdout], [], [], left)[0]:
            break
        line = recorder.stdout.readline()
        if not line:
            raise RuntimeError(f"py-spy exited with {recorder.wait()} before sampling")
        if b"Sampling process" in line:
            return
    raise RuntimeError(f"py-spy did not start sampling within {timeout:g} s")


def py_spy() -> str | None:
    """The py-spy executable (the bench extra installs it), or None."""
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="the emulator's time to first token")
    parser.add_argument("--tokens-per-second", type=float, default=0.0, help="0: the whole answer at once")
    parser.add_argument("--answer-tokens", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--gevent", action="store_true")
    parser.add_argument("--difyq-src", type=Path, default=REPO_ROOT)
    parser.add_argument("--difyq-env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "difyq-profile")
    args = parser.parse_args()
    spy = py_spy()
    if spy is None:
        print("py-spy is not installed: .venv/bin/pip install -e '.[bench]'", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    extra_env = dict(item.partition("=")[::2] for item in args.difyq_env)
    profile = Profile(f"{args.latency_ms:g}ms", args.latency_ms / 1000, args.tokens_per_second, args.answer_tokens)
    with scratch_bench("difyq-profile-", args.difyq_src.resolve()) as bench, bench.emulating(profile), \
            bench.pipeline("difyq", WorkerShape(args.processes, args.threads, args.gevent),
                           **({"extra_env": extra_env} if extra_env else {})) as pipeline:
        warm_up(bench, pipeline, 20.0)
        recorders = []
        for service in pipeline.services:
            output = args.out / f"{service.name}.txt"
            recorders.append((output, subprocess.Popen(
                [spy, "record", "--pid", str(service.pid), "--subprocesses", "--rate", "250",
                 "--duration", str(int(args.seconds)), "--format", "raw", "--gil",
                 "--output", str(output)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)))
        for _, recorder in recorders:
            wait_until_sampling(recorder)
        submissions = asyncio.run(open_loop(pipeline.submitter, args.rate, args.seconds - 2.0))
        for _, recorder in recorders:
            recorder.wait()
        ids = {s.job_id for s in submissions if s.job_id}
        arrived = bench.sink.wait_for(ids, timeout=30 + profile.nominal_s)
        for output, _ in recorders:
            if output.exists():
                print(summarize(output, len(arrived)))
        print(f"raw stacks in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
