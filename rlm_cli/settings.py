"""Settings of the `rlm` command itself (logging, where `rlm up` leaves its stack's address),
and the one way every command turns a bad setting into a one-line error."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

import click
from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

LogFormat = Literal["json", "console"]
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

SettingsT = TypeVar("SettingsT", bound=BaseSettings)


class CliSettings(BaseSettings):
    """How `rlm` logs, and where `rlm up` and `rlm ask` meet; each variable is `RLM_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="RLM_", frozen=True, extra="ignore")

    log_level: str | None = Field(
        None,
        description="Level of the logs on stderr (DEBUG, INFO, WARNING, ERROR). Unset: INFO "
        "for json logs, WARNING for console logs (`--log-level`).",
    )
    log_format: LogFormat | None = Field(
        None,
        description="json: one JSON object a line; console: human-readable. Unset: console "
        "when stderr is a terminal, else json (`--log-format`).",
    )
    stack_env_file: Path = Field(
        Path(".rlm/local-stack.env"),
        description="Where `rlm up` writes its stack's URLs and tokens (mode 0600, removed at "
        "stop) and where `rlm ask` looks for a running stack; relative to the working directory.",
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if value.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return value.upper()

    def log_output(self, *, terminal: bool) -> tuple[str, LogFormat]:
        """(level, format): console at WARNING on a terminal, JSON at INFO otherwise, unless
        set. A terminal keeps `rlm ask`'s status line; a pipe or a file gets every event."""
        fmt: LogFormat = self.log_format or ("console" if terminal else "json")
        level = self.log_level or ("INFO" if fmt == "json" else "WARNING")
        return level, fmt


class SettingError(click.ClickException):
    """A setting has a bad value: one line naming the variable, exit status 2 (a usage error)."""

    exit_code = 2


def load_settings(cls: type[SettingsT], **overrides: Any) -> SettingsT:
    """`cls` from the environment and `overrides` (None values ignored); a bad value is a
    `SettingError` naming the variable."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return cls(**given)
    except ValidationError as exc:
        raise SettingError(describe_error(cls, exc)) from exc


def describe_error(cls: type[BaseSettings], exc: ValidationError) -> str:
    """The first error of `exc` on one line, with the variable it came from."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    error = exc.errors()[0]
    message = " ".join(str(error["msg"]).removeprefix("Value error, ").split())
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    if not error["loc"]:  # a check of several fields together
        return f"invalid settings: {message}{more}"
    variable = (prefix + str(error["loc"][0])).upper()
    return f"invalid setting {variable}: {message}{more}"


def cli_settings() -> CliSettings:
    """The settings the `rlm` group read at start; read now when a command runs on its own."""
    ctx = click.get_current_context(silent=True)
    found = ctx.find_object(CliSettings) if ctx is not None else None
    return found if found is not None else load_settings(CliSettings)
