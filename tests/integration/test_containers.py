"""Dockerfile and docker-compose.yml, checked without Docker (no engine on our machines).

Statically: the image installs this very package (``pip install .`` of the checkout's
pyproject.toml) and runs ``dq-run`` as a non-root user; every compose service built from the
repository runs a valid ``dq-run`` command line on a config that ``dq-run validate`` accepts with
the service's environment; Redis keeps tasks (appendonly, noeviction); Prometheus and Grafana
mount files that exist. Then the compose commands themselves run against a throwaway Redis: the
worker replicas start, the publisher publishes deploy/sample-tasks.jsonl, the workers run every
task and stop with exit code 0 on SIGTERM.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Any

import click
import pytest
import yaml

import runner
from runner.brokers.redis.broker import RedisBroker
from runner.ops.cli import cli
from tests.cli.run_kit import DQ_RUN, REPO, dq_env, run
from tests.redis_server import RedisServer

if sys.version_info >= (3, 11):
    import tomllib
else:  # the project supports 3.10, which has no tomllib
    tomllib = pytest.importorskip("tomli")

DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "docker-compose.yml"


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the line, continuations joined

    def words(self) -> list[str]:
        """Exec form (a JSON list) or shell form, as a list of words."""
        if self.args.startswith("["):
            return [str(word) for word in json.loads(self.args)]
        return shlex.split(self.args)


def dockerfile() -> list[Instruction]:
    instructions = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, args = (pending + stripped).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    return instructions


def pyproject() -> dict[str, Any]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def built_here(service: dict[str, Any]) -> bool:
    build = service.get("build")
    context = build.get("context") if isinstance(build, dict) else build
    return context in (".", "./")


def service_command(service: dict[str, Any]) -> list[str]:
    """The dq-run arguments a service built from the Dockerfile runs (its CMD by default)."""
    command = service.get("command")
    if command is None:
        (cmd,) = [i for i in dockerfile() if i.keyword == "CMD"]
        return cmd.words()
    return [str(word) for word in command] if isinstance(command, list) else shlex.split(command)


def service_env(service: dict[str, Any]) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {str(k): str(v) for k, v in environment.items()}


def parse_command(argv: list[str]) -> tuple[str, dict[str, Any]]:
    """Parse ``dq-run ARGV`` with the real click CLI; returns the subcommand and its params."""
    root = click.Context(cli, info_name="dq-run")
    name, command, rest = cli.resolve_command(root, list(argv))
    assert name is not None and command is not None
    assert argv[0] == name, f"{argv[0]!r} is not a dq-run subcommand"
    context = command.make_context(name, rest, parent=root)
    return name, dict(context.params)


def dq_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if built_here(s)}


# -- Dockerfile --------------------------------------------------------------------------------


def test_dockerfile_installs_this_package_and_runs_dq_run_as_non_root() -> None:
    steps = dockerfile()
    (base,) = [i.args for i in steps if i.keyword == "FROM"]
    image = re.fullmatch(r"python:(\d+)\.(\d+)-slim\S*", base)
    assert image, base
    project = pyproject()
    floor = re.fullmatch(r">=(\d+)\.(\d+)", project["project"]["requires-python"])
    assert floor and tuple(map(int, image.groups())) >= tuple(map(int, floor.groups()))

    installs = [n for n, i in enumerate(steps) if i.keyword == "RUN" and "pip install" in i.args]
    assert len(installs) == 1
    install = installs[0]
    words = steps[install].words()
    assert words[words.index("install") + 1 :].count(".") == 1  # pip install . (the checkout)
    copied_before = {
        PurePosixPath(src).parts[0]
        for i in steps[:install]
        if i.keyword == "COPY"
        for src in i.words()[:-1]
    }
    included = project["tool"]["setuptools"]["packages"]["find"]["include"]
    top_levels = {p.split(".")[0] for p in included}
    assert top_levels == {"runner"}  # handlers/ is not installed: it would shadow a user's own
    assert {"pyproject.toml", project["project"]["readme"], *top_levels} <= copied_before
    copied = {
        PurePosixPath(s).parts[0] for i in steps if i.keyword == "COPY" for s in i.words()[:-1]
    }
    assert "handlers" in copied  # the demo handlers, found from the working directory

    users = [i.args for i in steps if i.keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert steps.index(next(i for i in steps if i.keyword == "USER")) > install
    (entrypoint,) = [i.words() for i in steps if i.keyword == "ENTRYPOINT"]
    assert entrypoint == ["dq-run"]
    assert project["project"]["scripts"]["dq-run"] == "runner.ops.cli:main"


def test_tests_run_the_package_the_image_installs() -> None:
    # The tests import runner from this checkout and run the dq-run that pip installed from
    # it (editable), the same pyproject.toml the image installs with `pip install .`.
    assert Path(runner.__file__).resolve().parent == REPO / "runner"
    name = pyproject()["project"]["name"]
    installed = [
        d
        for d in metadata.distributions(name=name)
        if json.loads(d.read_text("direct_url.json") or "{}").get("url") == REPO.as_uri()
    ]
    assert installed, f"{name} is not pip-installed from {REPO}"
    scripts = [e for e in installed[0].entry_points if e.group == "console_scripts"]
    assert {(e.name, e.value) for e in scripts} == {("dq-run", "runner.ops.cli:main")}
    assert Path(DQ_RUN).exists()


def test_every_file_the_image_copies_exists() -> None:
    for step in dockerfile():
        if step.keyword == "COPY":
            for source in step.words()[:-1]:
                assert (REPO / source).exists(), source


# -- docker-compose.yml ------------------------------------------------------------------------


def test_compose_services_built_here_run_valid_dq_run_commands() -> None:
    services = dq_services()
    assert {"worker", "publisher"} <= set(services)
    copied = {
        PurePosixPath(src).parts[0]
        for i in dockerfile()
        if i.keyword == "COPY"
        for src in i.words()[:-1]
    }
    for name, service in services.items():
        argv = service_command(service)
        command, params = parse_command(argv)
        config = params["config_file"]
        assert PurePosixPath(config).parts[0] in copied, f"{name}: {config} is not in the image"
        if command == "publish" and params.get("input_file"):
            assert PurePosixPath(params["input_file"]).parts[0] in copied
        result = run("validate", config, **service_env(service))
        assert result.returncode == 0, f"{name}: {result.stderr}"
        assert result.stdout.startswith(f"OK {config}")
    assert parse_command(service_command(services["worker"]))[0] == "run"
    assert parse_command(service_command(services["publisher"]))[0] == "publish"


def test_compose_redis_keeps_tasks_and_workers_point_at_it() -> None:
    services = compose()["services"]
    argv = [str(word) for word in services["redis"]["command"]]
    options = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "redis-server"
    assert options["--appendonly"] == "yes"
    assert options["--maxmemory-policy"] == "noeviction"
    for name, service in dq_services().items():
        assert service_env(service)["REDIS_URL"].startswith("redis://redis:6379/"), name


def test_compose_monitoring_mounts_files_that_exist_and_match_the_workers() -> None:
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        mounts = [str(v).split(":") for v in services[name]["volumes"]]
        assert mounts
        for host, *_ in mounts:
            assert host.startswith("./") and (REPO / host).exists(), f"{name}: {host}"
    scrape = yaml.safe_load((REPO / "deploy/prometheus.yml").read_text())
    worker_config = yaml.safe_load((REPO / "configs/redis.yaml").read_text())
    sd = scrape["scrape_configs"][0]["dns_sd_configs"][0]
    assert sd["names"] == ["worker"] and sd["port"] == worker_config["metrics"]["port"]
    assert worker_config["metrics"]["enabled"] is True
    assert "127.0.0.1:3000:3000" in services["grafana"]["ports"]
    datasources = (REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    assert "http://prometheus:9090" in datasources


# -- the compose commands, run for real against a throwaway Redis ------------------------------


class Process:
    """A dq-run subprocess whose output goes to files (a pipe could fill up and stall it)."""

    def __init__(self, argv: list[str], env: dict[str, str], logs: Path, name: str) -> None:
        self.stderr = logs / f"{name}.err"
        with self.stderr.open("w") as err, (logs / f"{name}.out").open("w") as out:
            self.process = subprocess.Popen(
                [DQ_RUN, *argv], cwd=REPO, env=dq_env(**env), stdout=out, stderr=err
            )

    def started_or_exited(self) -> bool:
        return bool(self.events("worker.started")) or self.process.poll() is not None

    def events(self, name: str) -> list[dict[str, Any]]:
        lines = (json.loads(t) for t in self.stderr.read_text().splitlines() if t.startswith("{"))
        return [line for line in lines if line.get("event") == name]


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for each in started:
        if each.process.poll() is None:
            each.process.kill()
            each.process.wait(timeout=10)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.redis
def test_compose_commands_run_the_sample_tasks_against_redis(
    tmp_path: Path,
    redis_server_factory: Callable[..., RedisServer],
    processes: list[Process],
) -> None:
    server = redis_server_factory(appendonly=True, options={"maxmemory-policy": "noeviction"})
    services = dq_services()
    # Only the Redis address and the metrics endpoint differ from compose: tests bind only
    # 127.0.0.1 and must not collide on port 9464.
    local = {"REDIS_URL": server.url, "DQ_METRICS__HOST": "127.0.0.1", "DQ_METRICS__PORT": "0"}
    worker = services["worker"]
    replicas = int(worker.get("deploy", {}).get("replicas", 1))
    for i in range(replicas):
        env = {**service_env(worker), **local}
        processes.append(Process(service_command(worker), env, tmp_path, f"worker-{i}"))
    for each in processes:
        wait_for(each.started_or_exited, 30, "a worker to start")
        assert each.process.poll() is None, each.stderr.read_text()

    publisher = services["publisher"]
    result = run(*service_command(publisher), **{**service_env(publisher), **local})
    assert result.returncode == 0, result.stderr
    published = set(result.stdout.split())
    sample = (REPO / "deploy/sample-tasks.jsonl").read_text().splitlines()
    assert len(published) == len([line for line in sample if line.strip()])

    def succeeded() -> list[str]:
        return [str(e["task_id"]) for p in processes for e in p.events("task.succeeded")]

    wait_for(lambda: len(succeeded()) >= len(published), 60, "every sample task to succeed")
    assert sorted(succeeded()) == sorted(published)
    namespace = yaml.safe_load((REPO / "configs/redis.yaml").read_text())["broker"]["namespace"]
    broker = RedisBroker(server.url, namespace, 10, 1.0, "block", 60.0)
    try:
        assert sum(d.total for d in broker.depth().values()) == 0
        assert broker.dead_letter_count() == 0
    finally:
        broker.close()
    for each in processes:
        each.process.send_signal(signal.SIGTERM)
    assert [each.process.wait(timeout=30) for each in processes] == [0] * replicas


def test_every_data_file_of_the_package_is_shipped() -> None:
    """The Lua scripts (and py.typed) are package data: a wheel without them would import and
    then fail at the first Redis call."""
    patterns = pyproject()["tool"]["setuptools"]["package-data"]["runner"]
    data = {
        p.relative_to(REPO / "runner")
        for p in (REPO / "runner").rglob("*")
        if p.is_file() and p.suffix not in (".py", ".pyc")
    }
    assert data, "no data files found: the test looks in the wrong place"
    unshipped = {str(p) for p in data if not any(p.match(pattern) for pattern in patterns)}
    assert unshipped == set()
