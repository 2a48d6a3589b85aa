# dq-run in a container: the same package the tests install (pip install . from this checkout).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

COPY pyproject.toml README.md ./
COPY runner ./runner
RUN pip install .

# The demo handlers are not installed (a top-level "handlers" package would shadow a user's
# own): dq-run finds them from the working directory, as `make demo` does.
COPY handlers ./handlers
COPY configs ./configs
COPY deploy ./deploy

RUN useradd --create-home --uid 10001 dq && mkdir -p /app/var && chown dq /app/var
USER dq

ENTRYPOINT ["dq-run"]
CMD ["run", "configs/redis.yaml"]
