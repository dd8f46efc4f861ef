# The chat server in one image: Python packages from uv.lock, the browser
# client's libraries from package-lock.json, run as a non-root user with the
# SQLite data folder as a volume. For several processes on PostgreSQL see
# compose.yaml.

FROM node:20-slim AS frontend
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error

FROM python:3.11-slim
# Bytecode compiled at build time: the non-root user cannot write it, and a
# start that compiles misses the one-second start-up target.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    PYTHONUNBUFFERED=1 \
    PATH=/app/.venv/bin:$PATH
RUN pip install --no-cache-dir "uv>=0.5,<1" \
    && useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin chat \
    && mkdir -p /data/files && chown -R chat /data
WORKDIR /app
COPY pyproject.toml uv.lock README.md ./
RUN uv sync --frozen --no-install-project
COPY alembic.ini ./
COPY migrations ./migrations
COPY public ./public
COPY chatserver ./chatserver
RUN uv sync --frozen
COPY --from=frontend /app/node_modules ./node_modules

USER chat
VOLUME /data
ENV HOST=0.0.0.0 \
    PORT=8080 \
    CHAT_DATABASE_URL=sqlite+aiosqlite:////data/chat.db \
    CHAT_DATA_DIR=/data/files \
    CHAT_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8080'), timeout=2)"]
# One container on its own SQLite file migrates it first; with several
# processes on PostgreSQL, compose.yaml migrates once and runs `chatserver`.
CMD ["sh", "-c", "alembic upgrade head && exec chatserver"]
