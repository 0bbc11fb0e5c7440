# One image for the four services (python -m servers.<name>), the Envoy config renderer
# and the CLI. compose.yaml runs it; `make run` runs the same code from the working tree.
FROM node:20-bookworm-slim AS web
WORKDIR /src
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY gen/ts gen/ts
COPY web web
RUN node web/build.mjs

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    COPILOT_DATA_DIR=/data COPILOT_LOG_LEVEL=INFO COPILOT_MODEL_CACHE=/app/models
WORKDIR /app
COPY requirements.lock ./
RUN pip install --no-cache-dir -r requirements.lock
COPY pyproject.toml ./
COPY gen/python gen/python
COPY servers servers
COPY copilot_cli copilot_cli
COPY envoy envoy
COPY demo demo
RUN pip install --no-cache-dir --no-deps -e . && useradd --system --uid 10001 copilot \
    && mkdir -p /data && chown copilot /data
# The embedding model's ONNX export, made at build time: the service user has no writable home.
RUN python -c "import asyncio; from servers.retrieval.embedders import MiniLmEmbedder as M; asyncio.run(M().embed(['x']))"
COPY --from=web /src/web/dist web/dist
USER copilot
VOLUME ["/data"]
# Overridden per service in compose.yaml.
CMD ["python", "-m", "servers.metering"]
