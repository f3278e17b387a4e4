# difyq image: `difyq api` by default; `difyq worker ...` and `difyq scheduler` run from the same image.
#
# Stage "build" turns the sources into wheels (difyq's own, then every dependency's, compiling any that ship
# only as sources); stage "runtime" installs them from that local wheelhouse, without an index, into a slim
# Python that has no compiler, no pip cache and no source tree.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A compiler only for dependencies without a wheel for this platform (none on linux/amd64 today).
RUN apt-get update \
 && apt-get install --yes --no-install-recommends build-essential=12.9 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY worker/ worker/
COPY producers/ producers/
# The difyq wheel, built exactly as tests/test_dockerfile.py builds it; then the wheels of its dependencies and of
# the gevent extra (`difyq worker --gevent`) and the otel extra (OpenTelemetry traces, off unless OTEL_* asks).
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
 && pip wheel --no-cache-dir --wheel-dir /wheels '.[gevent,otel]'

FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="difyq" \
      org.opencontainers.image.description="Queue-driven background workers for Dify apps: webhooks, jobs API and cron in, signed callbacks out." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DIFYQ_LOG_FORMAT=json
RUN groupadd --system --gid 10001 difyq \
 && useradd --system --uid 10001 --gid difyq --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin difyq
# The same `pip install` of the same wheel that tests/test_dockerfile.py runs; the wheelhouse is bind-mounted
# from the build stage, so no wheel file stays in a layer. With --no-index, `difyq` can only be the one wheel there.
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels 'difyq[gevent,otel]'
WORKDIR /srv/difyq
USER 10001:10001
EXPOSE 8080 9191 9192
# Docker's own health check (Kubernetes uses the chart's probes instead). It asks the API by default; a
# worker (9191) or scheduler (9192) container sets DIFYQ_HEALTHCHECK_URL to its metrics port's /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ.get('DIFYQ_HEALTHCHECK_URL', 'http://127.0.0.1:8080/healthz'), timeout=4)"]
# Exec form, no shell and no init wrapper: difyq is PID 1 and `difyq worker` execs the Dramatiq master in place,
# so `docker stop` / the kubelet's SIGTERM reaches the master exactly once. (An init that signals the whole
# process group, such as `tini -g` or dumb-init's default, would TERM the children twice and kill running jobs.)
STOPSIGNAL SIGTERM
ENTRYPOINT ["difyq"]
CMD ["api", "--host", "0.0.0.0", "--port", "8080"]
