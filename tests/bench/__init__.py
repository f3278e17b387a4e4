"""The difyq benchmark harness (``make bench``; not part of ``make test``).

Real processes on loopback: a private Redis, the Dify emulator with a latency profile, a callback sink that
records arrival times, and one pipeline at a time (difyq's API and worker, or the ``bare`` Dramatiq and ``celery``
baselines). An open-loop load generator submits jobs at a target rate; a job ends when its callback reaches the
sink. ``tests.bench.run`` runs the scenarios and writes ``tests/bench/results/``.
"""
