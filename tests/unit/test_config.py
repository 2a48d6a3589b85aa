"""load_config: interpolation, sources and their precedence, locations, rules, warnings."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from runner.config.load import config_warnings, load_config, render_config
from runner.config.models import SIZE_PATTERN, PipelineConfig, parse_duration, parse_size
from runner.config.schema import config_json_schema
from runner.errors import ConfigError
from tests.unit.config_kit import as_run

ROOT = Path(__file__).resolve().parents[2]
BASE = "task_types:\n  email:\n    handler: handlers.demo:send_email\n"


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, **kwargs: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, environ=kwargs.pop("environ", {}), **kwargs)  # type: ignore[arg-type]
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("50ms", 0.05), ("2s", 2.0), ("1.5m", 90.0), ("1h", 3600.0), (3, 3.0), ("0.25", 0.25)],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["fast", "-1s", "2 days", "1.2.3s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_minimal_file_gets_defaults(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, BASE), environ={})
    assert config.workers == 4
    assert config.broker.kind == "memory"
    assert config.dead_letter.kind == "memory"  # filled in from the broker kind
    assert config.task_types["email"].timeout == 10.0
    assert config.concurrency_for("email") == 4
    assert config.retry_for("email") == config.retry


@pytest.mark.parametrize(
    ("broker", "prefetch", "expected"),
    [
        ({"kind": "memory"}, None, 16 * 4),  # nothing to lose in a crash: a deep buffer
        ({"kind": "sqlite", "path": "q.db"}, None, 2 * 4),  # shallow where a crash costs attempts
        ({"kind": "redis"}, None, 2 * 4),
        ({"kind": "redis"}, 8, 8),
        ({"kind": "redis"}, 0, 0),
        ({"kind": "memory"}, 0, 0),
    ],
)
def test_prefetch_default_depends_on_the_broker(
    broker: dict[str, str], prefetch: int | None, expected: int
) -> None:
    config = PipelineConfig.model_validate(
        {"broker": broker, "prefetch": prefetch, "task_types": {"t": {"handler": "m:f"}}}
    )
    assert config.effective_prefetch() == expected


def test_shipped_configs_load() -> None:
    for name in ("demo", "sqlite", "redis"):
        config = load_config(ROOT / "configs" / f"{name}.yaml", environ={})
        assert config.broker.kind == {"demo": "memory"}.get(name, name)
        assert config_warnings(config) == []


def test_interpolation_types_and_defaults(tmp_path: Path) -> None:
    text = (
        "workers: ${W:-3}\n"
        "broker:\n  namespace: '${NS:-q1}'\n  capacity: ${CAP}\n"
        "simulate:\n  tasks: ${T:-7}\n  seed: '${SEED:-5}'\n  mix: {email: 1}\n" + BASE
    )
    config = load_config(write(tmp_path, text), environ={"CAP": "12", "T": ""})
    assert config.workers == 3  # unquoted: typed again by YAML rules
    assert config.broker.capacity == 12
    assert config.broker.namespace == "q1"
    assert config.simulate is not None
    assert config.simulate.tasks == 7  # empty counts as unset, like the shell's :-
    assert config.simulate.seed == 5


def test_reference_in_a_flow_mapping_must_be_quoted(tmp_path: Path) -> None:
    # `{` is an indicator inside {...}; quoted, the string is still coerced to the field's type.
    path = write(tmp_path, "broker: {capacity: '${CAP:-8}'}\n" + BASE)
    assert load_config(path, environ={}).broker.capacity == 8


def test_escaped_reference_stays_literal(tmp_path: Path) -> None:
    path = write(tmp_path, "broker: {namespace: 'a$${b'}\n" + BASE)
    with pytest.raises(ConfigError, match="namespace"):  # '{' is not allowed in a namespace
        load_config(path, environ={})
    config = load_config(write(tmp_path, "logging: {level: '${L:-info}'}\n" + BASE), environ={})
    assert config.logging.level == "INFO"


def test_env_overrides_nested_and_map_entries(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 2\nbroker: {capacity: 10}\n" + BASE)
    environ = {
        "DQ_WORKERS": "6",
        "DQ_BROKER__CAPACITY": "50",
        "DQ_TASK_TYPES__EMAIL__CONCURRENCY": "4",
        "dq_task_types__email__timeout": "3s",  # names are case-folded
        "DQ_RETRY__NEVER_RETRY": '["KeyError"]',
        "DQ_REQUIRE_REDIS": "1",  # unknown top-level DQ_ names are ignored (used by tests/CI)
    }
    config = load_config(path, environ=environ)
    assert config.workers == 6
    assert config.broker.capacity == 50
    assert config.task_types["email"].concurrency == 4
    assert config.task_types["email"].timeout == 3.0
    assert config.task_types["email"].handler == "handlers.demo:send_email"  # merged, not replaced
    assert config.retry.never_retry == ("KeyError",)


def test_precedence_flags_over_env_over_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 2\n" + BASE)
    assert load_config(path, environ={}).workers == 2
    assert load_config(path, environ={"DQ_WORKERS": "3"}).workers == 3
    assert load_config(path, environ={"DQ_WORKERS": "3"}, flags={"workers": 5}).workers == 5
    assert load_config(path, environ={}, flags={"broker.capacity": 9}).broker.capacity == 9


def test_every_problem_is_reported_with_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 0\nbroker: {capacty: 3}\n" + BASE)
    found = problems(
        path,
        environ={"DQ_SHUTDOWN__GRACE": "soon", "DQ_TASK_TYPES__EMAIL__CONCURRENCY": "0"},
        flags={"metrics.port": 70000},
    )
    assert found == [
        f"{path}:1:10: workers: Input should be greater than or equal to 1 (got 0)",
        f"{path}:2:10: broker.capacty: unknown key 'capacty' (did you mean 'capacity'?)",
        "env DQ_SHUTDOWN__GRACE: shutdown.grace: invalid duration 'soon': use a number of "
        "seconds or 50ms, 2s, 1.5m, 1h",
        "env DQ_TASK_TYPES__EMAIL__CONCURRENCY: task_types.email.concurrency: Input should be "
        "greater than or equal to 1 (got '0')",
        "flag --metrics.port: metrics.port: Input should be less than or equal to 65535 "
        "(got 70000)",
    ]


def test_import_problems_come_with_type_problems(tmp_path: Path) -> None:
    text = "workers: x\ntask_types:\n  email: {handler: handlers.demo:nope}\n"
    found = problems(write(tmp_path, text))
    assert len(found) == 2
    assert "has no 'nope'" in found[1]
    assert found[1].startswith(f"{tmp_path / 'c.yaml'}:3:20: task_types.email.handler:")


def test_cross_field_rules_run_beside_other_problems(tmp_path: Path) -> None:
    text = (
        "broker:\n  kind: sqlite\n  capacty: 5\n  visibility_timeout: 10s\n"
        "workers: many\n"
        "task_types:\n  email:\n    handler: handlers.demo:send_email\n    timeout: 1m\n"
        "simulate:\n  mix: {email: 1, sms: 2}\n"
    )
    path = write(tmp_path, text)
    found = problems(path, environ={"DQ_DEAD_LETTER__KIND": "file"})
    assert found == [
        f"{path}:1:1: broker.path: required when broker.kind is sqlite",
        f"{path}:3:3: broker.capacty: unknown key 'capacty' (did you mean 'capacity'?)",
        f"{path}:5:10: workers: Input should be a valid integer, unable to parse string as an "
        "integer (got 'many')",
        f"{path}:9:14: task_types.email.timeout: 60s must be below broker.visibility_timeout "
        "(10s), or the task is handed out again while it still runs",
        f"{path}:11:19: simulate.mix.sms: 'sms' is not a declared task type (declared: email)",
        "env DQ_DEAD_LETTER__KIND: dead_letter.path: required when dead_letter.kind is file",
        "env DQ_DEAD_LETTER__KIND: dead_letter.kind: a sqlite broker keeps dead letters itself "
        "(kind: broker), so a record is written in the same step that removes the task; 'file' "
        "is not allowed",
    ]


@pytest.mark.parametrize(
    ("broker", "timeout", "reported"),
    [
        ("{visibility_timeout: soon}", "1m", "broker.visibility_timeout: invalid duration"),
        ("{visibility_timeout: 10s}", "-1", "task_types.email.timeout: Input should be greater"),
    ],
)
def test_a_rule_with_an_invalid_input_is_skipped(
    tmp_path: Path, broker: str, timeout: str, reported: str
) -> None:
    text = f"broker: {broker}\n{BASE}    timeout: {timeout}\n"
    found = problems(write(tmp_path, text))
    assert len(found) == 1, found  # the timeout rule is not judged on a guess
    assert reported in found[0]


def test_declared_names_with_a_bad_name_do_not_judge_simulate(tmp_path: Path) -> None:
    text = BASE + "  Sms: {handler: handlers.demo:send_email}\nsimulate: {mix: {sms: 1}}\n"
    found = problems(write(tmp_path, text))
    assert len(found) == 1, found
    assert "task type names must match" in found[0]


def test_env_only_task_type_is_located_at_its_variable(tmp_path: Path) -> None:
    found = problems(write(tmp_path, BASE), environ={"DQ_TASK_TYPES__SMS__TIMEOUT": "1s"})
    assert found == [
        "env DQ_TASK_TYPES__SMS__TIMEOUT: task_types.sms.handler: required, but missing"
    ]


def test_env_json_that_does_not_parse(tmp_path: Path) -> None:
    """A section, list or map set from the environment is JSON: a value that is not names its
    variable, its key path, what was expected and what came, one line per variable (not
    pydantic-settings' own words, which name its internal class and no key)."""
    found = problems(write(tmp_path, BASE), environ={"DQ_RETRY__NEVER_RETRY": "[oops"})
    assert found == [
        "env DQ_RETRY__NEVER_RETRY: retry.never_retry: expected JSON (a section, list or map"
        """ is set from the environment as JSON, e.g. DQ_RETRY__NEVER_RETRY='["ValueError"]'),"""
        " got '[oops'"
    ]
    environ = {"DQ_RETRY": "1s", "DQ_RETRY__MAX_ATTEMPTS": "3", "DQ_TASK_TYPES": "x",
               "DQ_WORKERS": "2"}  # fmt: skip
    found = problems(write(tmp_path, BASE), environ=environ)
    assert [line.split(": expected JSON")[0] for line in found] == [
        "env DQ_RETRY: retry",
        "env DQ_TASK_TYPES: task_types",
    ]
    assert all("_EnvSource" not in line and line.endswith("got '1s'") for line in found[:1])


def test_handler_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "cfg_local_handlers.py").write_text("def work(payload):\n    return 1\n")
    text = "handler_paths: [lib]\ntask_types:\n  local: {handler: cfg_local_handlers:work}\n"
    config = load_config(write(tmp_path, text), environ={})
    assert config.handler_paths == (str((tmp_path / "lib").resolve()),)


def test_merge_keys_and_anchors(tmp_path: Path) -> None:
    text = (
        "defaults: &d {handler: handlers.demo:send_email, timeout: 2s}\n"
        "task_types:\n  a: {<<: *d, concurrency: 1}\n  b: {<<: *d, timeout: 3s}\n"
    )
    found = problems(write(tmp_path, text))
    assert found == [
        f"{tmp_path / 'c.yaml'}:1:1: defaults: unknown key 'defaults' (did you mean 'results'?)"
    ]
    text = (
        "task_types:\n  a: &d {handler: handlers.demo:send_email, timeout: 2s}\n"
        "  b: {<<: *d, timeout: 3s}\n"
    )
    config = load_config(write(tmp_path, text), environ={})
    assert config.task_types["b"].handler == "handlers.demo:send_email"
    assert config.task_types["b"].timeout == 3.0


def test_warnings(tmp_path: Path) -> None:
    text = "workers: 1\nbroker: {url: 'redis://x'}\n" + BASE + "    concurrency: 3\n"
    config = load_config(write(tmp_path, text), environ={})
    assert config.concurrency_for("email") == 1
    assert config_warnings(config) == [
        "task_types.email.concurrency: 3 is above workers (1); at most 1 can run at once",
        "broker.url: ignored: broker.kind is memory, not redis",
    ]


def test_retry_override_merges_with_defaults(tmp_path: Path) -> None:
    text = (
        "retry: {max_attempts: 4, never_retry: [KeyError]}\n" + BASE + "    retry:\n"
        "      max_attempts: 2\n      backoff: {max: 9s}\n"
    )
    config = load_config(write(tmp_path, text), environ={})
    policy = config.retry_for("email")
    assert policy.max_attempts == 2
    assert policy.backoff.max == 9.0
    assert policy.backoff.initial == config.retry.backoff.initial
    assert policy.never_retry == ("KeyError",)


def test_render_names_every_source_and_loads_back(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 2\nbroker: {capacity: 10}\nmetrics: {host: '$${x}'}\n" + BASE)
    environ = {"DQ_BROKER__CAPACITY": "50"}
    text = render_config(path, environ=environ, flags={"workers": 7})
    assert "workers: 7  # flag --workers" in text
    assert "capacity: 50  # env DQ_BROKER__CAPACITY" in text
    assert f"handler: handlers.demo:send_email  # {path}:6" in text
    assert "host: $${x}  # " in text
    assert "overflow: block  # default" in text
    assert "prefetch: 112  # computed: 16 x workers\n" in text  # not `prefetch: null`
    assert "    concurrency: 7  # computed: workers\n" in text
    again = write(tmp_path, text, "again.yaml")
    assert as_run(load_config(again, environ={})) == as_run(
        load_config(path, environ=environ, flags={"workers": 7})
    )


def test_json_schema_accepts_references_and_durations() -> None:
    schema = config_json_schema()
    json.dumps(schema)  # serialisable
    workers = schema["properties"]["workers"]
    patterns = [branch.get("pattern", "") for branch in workers["anyOf"]]
    assert any("\\$\\{" in p for p in patterns)
    timeout = schema["$defs"]["TaskTypeConfig"]["properties"]["timeout"]
    assert any("ms|s|m|h" in branch.get("pattern", "") for branch in timeout["anyOf"])
    handler = schema["$defs"]["TaskTypeConfig"]["properties"]["handler"]
    assert "module:function" in handler["description"]


def test_shipped_schema_file_is_current() -> None:
    shipped = json.loads((ROOT / "configs" / "schema.json").read_text())
    assert shipped == config_json_schema(), "regenerate: dq-run schema > configs/schema.json"


def test_models_are_frozen() -> None:
    config = PipelineConfig.model_validate({"task_types": {"a": {"handler": "m:f"}}})
    with pytest.raises(ValueError, match="frozen"):
        config.workers = 3  # type: ignore[misc]


def test_render_prints_the_values_in_force_and_how_they_were_computed(tmp_path: Path) -> None:
    text = (
        "broker: {kind: sqlite, path: q.db}\nworkers: 3000\n"
        "task_types:\n"
        "  a: {handler: handlers.demo:send_email, concurrency: 5000}\n"
        "  b: {handler: handlers.demo:send_email, concurrency: 2}\n"
    )
    path = write(tmp_path, text)
    rendered = render_config(path, environ={}, flags={"workers": 1000})
    lines = {line.strip() for line in rendered.splitlines()}
    assert "prefetch: 2000  # computed: 2 x workers" in lines
    assert f"concurrency: 5000  # {path}:4; in force: 1000 (capped at workers)" in lines
    assert f"concurrency: 2  # {path}:5" in lines
    huge = render_config(write(tmp_path, "workers: 1000\n" + BASE, "huge.yaml"), environ={})
    assert "prefetch: 4096  # computed: 16 x workers, at most 4096" in huge
    explicit = write(tmp_path, "prefetch: 0\n" + BASE, "explicit.yaml")
    assert "prefetch: 0  # " in render_config(explicit, environ={})


@pytest.mark.parametrize(
    "text",
    ["512MB", "512mb", "2Gb", "64kB", "10b", " 1.5 GB ", "4096", "512 MiB", "MB", "1TB", "-1KB"],
)
def test_the_schemas_size_pattern_takes_what_the_loader_takes(text: str) -> None:
    """An editor that checks the YAML against configs/schema.json flags exactly the sizes the
    runner refuses (``512mb`` was flagged, yet loaded)."""
    try:
        parse_size(text)
        loads = True
    except ValueError:
        loads = False
    assert bool(re.match(SIZE_PATTERN, text)) is loads
