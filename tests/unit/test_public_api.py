"""The public names of the package are curated: adding or removing one is a deliberate act."""

from __future__ import annotations

import importlib

import runner

EXPECTED = {
    "BrokerClosed",
    "BrokerError",
    "BrokerUnavailable",
    "ConfigError",
    "DeadLetter",
    "InvalidPayload",
    "Middleware",
    "PermanentError",
    "PipelineConfig",
    "QueueFull",
    "Retry",
    "Runner",
    "RunnerError",
    "Task",
    "TaskContext",
    "UsageError",
    "build_runtime",
    "load_config",
}


def test_all_lists_exactly_the_public_names() -> None:
    assert set(runner.__all__) == EXPECTED


def test_every_public_name_resolves() -> None:
    # Each name is the very object its home module defines (the lazy ones through
    # runner.__getattr__ included), not merely something that is not None.
    for name in runner.__all__:
        obj = getattr(runner, name)
        assert getattr(obj, "__name__", None) == name, name
        home = importlib.import_module(obj.__module__)
        assert home.__name__.startswith("runner."), name
        assert getattr(home, name) is obj, name


def test_errors_share_one_root() -> None:
    for name in ("BrokerClosed", "BrokerError", "BrokerUnavailable", "ConfigError",
                 "PermanentError", "QueueFull", "Retry", "UsageError"):  # fmt: skip
        assert issubclass(getattr(runner, name), runner.RunnerError), name


def test_library_round_trip() -> None:
    config = runner.PipelineConfig.model_validate(
        {"task_types": {"email": {"handler": "handlers.demo:send_email"}}}
    )
    pipeline = runner.build_runtime(config, observe=False)
    with pipeline:
        task_id = pipeline.publish("email", {"to": "a@example.com"})
        assert pipeline.run_until_empty(timeout=10)
    assert len(task_id) == 32
    assert pipeline.summary.to_dict()["totals"]["succeeded"] == 1
