"""load_config(): a YAML file plus the environment and CLI flags, as one validated PipelineConfig.

Flow: YAML file (runner.config.document: marks, duplicate keys, ${VAR:-default}) ->
pydantic-settings sources in precedence order (CLI flags > DQ_* environment > YAML > model
defaults) -> validated, frozen PipelineConfig -> cross-field rules and handler imports
(runner.config.rules), which also run on the merged input when validation fails, each rule whose
own inputs are valid. Every problem found is raised together in one ConfigError, each located as
``file:LINE:COL``, ``env DQ_...`` or ``flag --...``. Durations are seconds (float) once
validated.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import (
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from runner.config import rules as configcheck
from runner.config.document import read_document
from runner.config.models import PipelineConfig
from runner.config.origins import Loaded, Origins, absolutize_handler_paths, render, resolved
from runner.errors import ConfigError, Problem

ENV_PREFIX = "DQ_"


ENV_NESTED_DELIMITER = "__"


class _Invalid(Exception):
    """Carries the merged input out of validation, so problems can be traced to their source."""

    def __init__(self, data: Any, error: ValidationError) -> None:
        super().__init__(str(error))
        self.data = data
        self.error = error


class _PipelineSettings(PipelineConfig, BaseSettings):
    """The models plus pydantic-settings' source machinery; only load_with_sources uses it."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,  # so DQ_TASK_TYPES__EMAIL__... names the type "email"
        extra="forbid",
        frozen=True,
    )

    @model_validator(mode="wrap")
    @classmethod
    def _keep_input(cls, data: Any, handler: Any) -> Any:
        try:
            return handler(data)
        except ValidationError as exc:
            raise _Invalid(data, exc) from None


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' environment source, reading a given mapping instead of os.environ."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._environ.items()}


class _DocumentSource(PydanticBaseSettingsSource):
    """The YAML document (already parsed and interpolated) as the lowest-priority source."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return self._data


def load_config(
    path: str | Path,
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> PipelineConfig:
    """Read, merge and validate a config file; raise ConfigError with every problem found.

    ``flags`` are CLI overrides keyed by dotted path (``{"workers": 5, "broker.capacity": 9}``);
    ``environ`` defaults to ``os.environ`` and supplies both ``${VAR}`` references and ``DQ_*``
    overrides. Handlers and never_retry names are imported and checked.
    """
    return load_with_sources(path, flags=flags, environ=environ).config


def load_with_sources(
    path: str | Path,
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Loaded:
    """Like load_config, but also returns the origin of every value (for ``dq-run config``)."""
    environ = os.environ if environ is None else environ
    file = Path(path)
    doc = read_document(file, str(path), environ)
    absolutize_handler_paths(doc, file.parent)
    origins = Origins.build(doc, flags or {}, environ, ENV_PREFIX)
    env_vars = {k: v for k, v in environ.items() if k.upper().startswith(ENV_PREFIX)}
    problems = list(doc.problems)
    sources = (
        InitSettingsSource(_PipelineSettings, init_kwargs=origins.flag_tree),
        _EnvSource(_PipelineSettings, env_vars),
        _DocumentSource(_PipelineSettings, doc.data),
    )
    try:
        # pydantic-settings merges the sources (first wins) and validates the result.
        settings = _PipelineSettings(_build_sources=(sources, {}))
    except _Invalid as invalid:
        problems += origins.validation_problems(invalid.error, PipelineConfig)
        problems += origins.located(configcheck.import_problems(invalid.data))
        inputs = origins.inputs(invalid.data, PipelineConfig, invalid.error)
        problems += origins.located(configcheck.cross_field_problems(inputs))
        raise ConfigError(origins.ordered(problems)) from None
    except SettingsError as exc:
        problems += _env_json_problems(env_vars) or [_env_parse_problem(origins, exc)]
        raise ConfigError(origins.ordered(problems)) from None
    config = PipelineConfig.model_validate(settings.model_dump())
    # Paths from flags or the environment are relative to the working directory.
    absolute = tuple(resolved(Path(p)) for p in config.handler_paths)
    config = config.model_copy(update={"handler_paths": absolute})
    problems += origins.located(configcheck.import_problems(config.model_dump()))
    inputs = origins.inputs(config.model_dump(), PipelineConfig)
    problems += origins.located(configcheck.cross_field_problems(inputs))
    if problems:
        raise ConfigError(origins.ordered(problems))
    return Loaded(config=config, origins=origins)


def _env_json_problems(env_vars: Mapping[str, str]) -> list[Problem]:
    """The ``DQ_*`` variables whose value pydantic-settings cannot decode on its own: a
    section, list or map is read from the environment as JSON. Each variable is tried alone,
    with pydantic-settings' own rules, so that each one at fault gets its own line."""
    problems = []
    for name, value in env_vars.items():
        try:
            _EnvSource(_PipelineSettings, {name: value})()
        except SettingsError:
            path = ".".join(name[len(ENV_PREFIX) :].lower().split("__"))
            example = """DQ_RETRY__NEVER_RETRY='["ValueError"]'"""
            why = f"is set from the environment as JSON, e.g. {example}"
            message = f"expected JSON (a section, list or map {why}), got {value!r}"
            problems.append(Problem(f"env {name}", path, message))
    return problems


def _env_parse_problem(origins: Origins, exc: SettingsError) -> Problem:
    """The variables together fail where each alone decodes: pydantic-settings' words, minus
    the name of its source class."""
    said = str(exc).split(" from source ")[0]
    return Problem(origins.env_label(str(exc)), "", f"cannot combine these values: {said}")


def config_warnings(config: PipelineConfig) -> list[str]:
    """Non-fatal findings (e.g. a concurrency above workers), one line each, key path first."""
    return configcheck.warnings(config)


def render_config(
    path: str | Path,
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str:
    """The effective config as YAML, each value commented with its origin; loads back equal."""
    return render(load_with_sources(path, flags=flags, environ=environ), str(path))
