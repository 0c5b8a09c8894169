# jit-broker image: `broker-cli serve`, non-root, nothing to build with in the final stage.
#   docker build -t jit-broker:0.1.0 .
#   docker run --rm -p 8080:8080 --env-file broker.env -v ./config:/etc/jit-broker:ro jit-broker:0.1.0
#   docker run --rm --env-file broker.env --entrypoint broker-cli jit-broker:0.1.0 migrate
# Not built or run in this repository's CI (no container engine there): see README, "Deploying".

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- build: wheels for the broker and every dependency, installed into a venv -----------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY broker ./broker
RUN pip wheel --wheel-dir /wheels .
RUN python -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-index --find-links /wheels jit-broker
# The Alembic scripts live beside the package in a checkout (broker/migrate.py looks for
# <site-packages>/migrations); put them there and prove `broker-cli migrate` will find them.
COPY migrations ./migrations
# (-I: isolated, so the check imports the installed broker, not ./broker of this directory.)
RUN purelib="$(/opt/venv/bin/python -I -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" \
 && cp -r migrations "$purelib/migrations" \
 && /opt/venv/bin/python -I -c "from broker.migrate import MIGRATIONS; assert (MIGRATIONS / 'env.py').is_file(), MIGRATIONS" \
 && /opt/venv/bin/python -I -m compileall -q "$purelib/migrations" \
 && /opt/venv/bin/python -I -m pip uninstall --yes pip

# --- runtime: the venv, a user, nothing else ----------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="jit-broker" \
      org.opencontainers.image.description="Just-in-time credential broker for AI coding agents" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base's own pip goes too: nothing is installed at run time.
RUN groupadd --system --gid 10001 broker \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin broker \
 && python -m pip uninstall --yes pip
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    BROKER_HOST=0.0.0.0 \
    BROKER_PORT=8080 \
    BROKER_LOG_FORMAT=json
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BROKER_PORT', '8080'), timeout=2)"]
ENTRYPOINT ["broker-cli", "serve"]
