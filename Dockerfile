# syntax=docker/dockerfile:1.7
#
# One image for the dispatcher (`snaphook serve`, the default command) and the function host
# (`snaphook function serve`). Build:
#
#   docker build -t snaphook:0.1.0 .
#   docker build --build-arg CLIENT_PACKAGES= -t snaphook:0.1.0-slim .   # without dump clients
#
# Runs as UID/GID 65532 with a read-only root filesystem: the only writable paths are the
# state directory (the SQLite journal) and /tmp, both meant to be volumes.

# Python 3.11 on Debian trixie: its postgresql-client (17) dumps PostgreSQL servers up to 17,
# its mariadb-client (11.8) MariaDB and MySQL. Release builds pin the digest as well:
#   --build-arg PYTHON_IMAGE=python:3.11-slim-trixie@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim-trixie

# ---------------------------------------------------------------------------------------
# builder: wheels of snaphook and every dependency, built where compilers may exist.
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler only for the rare dependency without a wheel for this platform (arm64 builds);
# none of it reaches the final stage.
RUN apt-get update \
    && apt-get install --yes --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# Only what the wheel is built from (.dockerignore keeps the rest out of the context).
COPY pyproject.toml README.md ./
COPY dispatcher ./dispatcher
COPY functions ./functions
RUN pip wheel --wheel-dir /wheels .

# ---------------------------------------------------------------------------------------
# runtime: the interpreter, the installed wheels, the database client programs.
FROM ${PYTHON_IMAGE} AS runtime

# pg_dump/pg_restore/psql and mariadb-dump/mariadb, which postgres.* and mysql.* stream.
ARG CLIENT_PACKAGES="postgresql-client mariadb-client"
ARG VERSION=0.1.0

LABEL org.opencontainers.image.title="snaphook" \
      org.opencontainers.image.description="Async hook dispatcher that makes Kubernetes backups application-consistent" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SNAPHOOK_HOST=0.0.0.0 \
    SNAPHOOK_STATE_DIR=/var/lib/snaphook \
    SNAPHOOK_HOOKS=/etc/snaphook/hooks \
    PORT=8080

RUN if [ -n "${CLIENT_PACKAGES}" ]; then \
        apt-get update \
        && apt-get install --yes --no-install-recommends ${CLIENT_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --system --gid 65532 snaphook \
    && useradd --system --uid 65532 --gid 65532 --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin snaphook \
    && install --directory --owner 65532 --group 65532 --mode 0700 /var/lib/snaphook \
    && install --directory --mode 0755 /etc/snaphook/hooks

# The wheels are bind-mounted from the builder, so they never become a layer of this image.
# pip byte-compiles on install: with a read-only root filesystem nothing is compiled later.
# pip, setuptools and wheel go afterwards: nothing installs packages at run time.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels snaphook \
    && pip uninstall --yes pip setuptools wheel

# Kubernetes mounts its own volumes here; for `docker run --read-only` these keep the journal
# and temporary files writable.
VOLUME ["/var/lib/snaphook", "/tmp"]
WORKDIR /var/lib/snaphook

# Numeric, so that a kubelet enforcing runAsNonRoot can verify it without /etc/passwd.
USER 65532:65532
EXPOSE 8080

# No HEALTHCHECK: Kubernetes ignores it (the chart's probes use /healthz and /readyz), and
# the right URL depends on the command (dispatcher or function host) and on TLS.
ENTRYPOINT ["snaphook"]
CMD ["serve"]
