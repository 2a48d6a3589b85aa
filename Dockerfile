# dq-run in a container: the same package the tests install (pip install . from this checkout).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY runner ./runner
COPY handlers ./handlers
RUN pip install .

COPY configs ./configs
COPY deploy ./deploy

RUN useradd --create-home --uid 10001 dq && mkdir -p /app/var && chown dq /app/var
USER dq

ENTRYPOINT ["dq-run"]
CMD ["run", "configs/redis.yaml"]
