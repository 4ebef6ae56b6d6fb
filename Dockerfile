# syntax=docker/dockerfile:1
# xds-server: `docker build -t xds-server:0.1.0 .`, then
# `docker run -p 15012:15012 -p 15013:15013 xds-server:0.1.0` (xDS over TLS; plaintext 15010
# stays on the container's loopback: with --auth tokens it carries no secret off the host).
#
# Two stages: the first builds the project's wheel and the wheels of its runtime dependencies
# (no test extras), the second installs exactly those into a virtualenv on a clean base and
# runs as a non-root user. tests/unit/test_dockerfile.py runs these same RUN steps locally.
#
# The base is pinned to a Python patch release and Debian release; pin its digest too when
# you publish images (`docker buildx imagetools inspect python:3.11.17-slim-trixie`) and let
# a bot (Renovate, Dependabot) bump both.
ARG PYTHON_IMAGE=python:3.11.17-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xds_server ./xds_server
RUN pip wheel --wheel-dir /wheels .

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="xds-server" \
      org.opencontainers.image.description="An xDS control plane for Envoy service meshes" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PATH=/opt/xds-server/bin:$PATH \
    XDS_SERVER_XDS_ADDRESS=127.0.0.1:15010 \
    XDS_SERVER_XDS_TLS_ADDRESS=0.0.0.0:15012 \
    XDS_SERVER_LOG_FORMAT=json \
    XDS_SERVER_AUTH=tokens
# An address (where clients bring a bearer token over TLS), not a secret: DL3064 goes by the name.
# hadolint ignore=DL3064
ENV XDS_SERVER_XDS_TLS_TOKEN_ADDRESS=0.0.0.0:15013
RUN groupadd --system --gid 10001 xds \
 && useradd --system --uid 10001 --gid xds --home-dir /var/lib/xds-server --shell /usr/sbin/nologin xds \
 && install --directory --owner xds --group xds --mode 0750 /var/lib/xds-server
# Only wheels built above, nothing from the network: the project and its runtime dependencies.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    python -m venv /opt/xds-server \
 && /opt/xds-server/bin/pip install --no-cache-dir --no-index --find-links /wheels /wheels/xds_server-*.whl \
 && /opt/xds-server/bin/pip check
WORKDIR /var/lib/xds-server
USER 10001:10001
# xDS plaintext (loopback unless configured), xDS mutual TLS, xDS tokens over TLS, admin HTTP
EXPOSE 15010 15012 15013 15014
ENTRYPOINT ["xds-server", "serve"]
