# mcptwist in a container: the bridge runs as a non-root user under tini, which reaps orphans.
# Build: docker build -t mcptwist .
# Token: docker run --rm --entrypoint python mcptwist -m mcptwist token --name me
# Run:   docker run --rm -e MCPTWIST_TOKEN_HASH=sha256:... -p 127.0.0.1:8080:8080 mcptwist
#        (the built-in example server, behind that token; etc/docker/bridge.toml)
# Own:   docker run --rm -p 127.0.0.1:8080:8080 -v "$PWD/bridge.toml:/etc/mcptwist/bridge.toml:ro" mcptwist
# MCP servers that need Node (npx) or uv (uvx) need them in the image: add
#   RUN apt-get update && apt-get install -y --no-install-recommends nodejs npm && rm -rf /var/lib/apt/lists/*
# or RUN pip install --no-cache-dir uv
FROM python:3.11-slim

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

COPY . /src
RUN pip install --no-cache-dir /src \
    && install -D -m 0644 /src/etc/docker/bridge.toml /etc/mcptwist/bridge.toml \
    && rm -rf /src \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"

RUN useradd --system --home-dir /var/lib/mcptwist --create-home mcptwist
USER mcptwist
WORKDIR /var/lib/mcptwist
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s \
    CMD python -c "import urllib.request, sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4).status == 200 else 1)"
ENTRYPOINT ["/usr/bin/tini", "--", "twistd", "-n", "--pidfile=", "mcpbridge"]
CMD ["--config", "/etc/mcptwist/bridge.toml"]
