# Stormguard: the worker, simulator and tools (`stormguard --help`).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY detectors ./detectors
COPY stream_jobs ./stream_jobs
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /data stormguard \
 && mkdir -p /data && chown stormguard /data

USER stormguard
ENV STORMGUARD_DATA_DIR=/data \
    STORMGUARD_WEB_PORT=6066
EXPOSE 6066
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:6066/healthz', timeout=2)"
ENTRYPOINT ["stormguard"]
CMD ["run"]
