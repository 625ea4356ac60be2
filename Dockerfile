# syntax=docker/dockerfile:1
# mornGPT proxy container image.
#
#   docker build -t morngpt-proxy .
#   docker run --rm -p 8080:8080 -v "$PWD/my-proxy.yaml:/etc/morngpt/proxy.yaml:ro" \
#       -e OPENAI_API_KEY --stop-timeout 40 morngpt-proxy
#
# The entrypoint is `python -m proxy`; the default command serves the config at
# /etc/morngpt/proxy.yaml on 0.0.0.0:8080. Other commands take the same image:
#   docker run --rm morngpt-proxy migrate --config /etc/morngpt/proxy.yaml
#   docker run --rm morngpt-proxy check-config /etc/morngpt/proxy.yaml
#
# Stopping: SIGTERM makes the proxy fail /readyz, stop accepting and let in-flight
# streams run for server.grace_period seconds (30 by default). Docker's own stop
# timeout is 10 s, so give `docker stop`/`docker run` `--stop-timeout` (compose:
# stop_grace_period; Kubernetes: terminationGracePeriodSeconds) a little more than
# grace_period, or long streams are cut by SIGKILL. See docs/deploy.md.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the proxy and its runtime dependencies into /opt/venv --------
FROM ${PYTHON_IMAGE} AS build
# 1 (the default): the modules every request runs through are compiled with mypyc
# (setup.py's HOT; docs/performance.md, "The compiled hot path"). 0: plain Python.
ARG MORNGPT_COMPILE=1
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# mypyc's C needs a compiler (the base image has Python's headers). This stage only:
# the runtime image gets the built venv. The compiler is whatever the base's Debian
# release ships, hence no pinned versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv && python -m venv /opt/compile
WORKDIR /src
# The locked versions first (scripts/lock: every dependency pinned, every file's hash
# checked), so two builds of one commit install the same bytes, and a change to the
# code alone reuses these layers. /opt/compile gets the same runtime versions plus
# mypy and setuptools (requirements-compile.lock): mypyc type-checks against them.
COPY requirements.lock requirements-compile.lock ./
RUN /opt/venv/bin/pip install --require-hashes --no-deps -r requirements.lock \
    && /opt/compile/bin/pip install --require-hashes --no-deps -r requirements-compile.lock
# Then the proxy itself, built into a wheel in /opt/compile and installed into
# /opt/venv without resolving anything again; /opt/venv never holds mypy. Only what
# the package build reads is copied. pip and setuptools are not needed at run time,
# so they leave the venv too.
COPY pyproject.toml setup.py README.md ./
COPY proxy ./proxy
RUN /opt/compile/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /tmp/wheels . \
    && /opt/venv/bin/pip install --no-deps /tmp/wheels/*.whl \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && /opt/venv/bin/python -m compileall -q /opt/venv

# --- runtime: the venv, the example config and an unprivileged user, nothing else -
FROM ${PYTHON_IMAGE} AS runtime
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 morngpt \
    && useradd --system --uid 10001 --gid morngpt --home-dir /var/lib/morngpt \
        --create-home --shell /usr/sbin/nologin morngpt
COPY --from=build /opt/venv /opt/venv
COPY config/proxy.yaml /etc/morngpt/proxy.yaml
# Relative paths in a config (sqlite_path, the usage spool) land in the user's home.
WORKDIR /var/lib/morngpt
# Numeric, so that Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
USER 10001:10001
EXPOSE 8080
# /healthz answers while the event loop runs; python is the only HTTP client here.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
# The proxy drains on SIGTERM (see the header); SIGKILL comes after the stop timeout.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "proxy"]
CMD ["serve", "--config", "/etc/morngpt/proxy.yaml", "--host", "0.0.0.0", "--port", "8080"]
