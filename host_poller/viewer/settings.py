"""Settings of `rlm view`: one frozen object, built once at start from `RLM_VIEW_*`.

The viewer shows tenants' prompts and outputs, so it listens on loopback unless a token
guards it, and every read it does is bounded here. The directory it reads is the host's
(`HostSettings.trajectory_dir`, RLM_TRAJECTORY_DIR), passed in by the caller.
"""

from __future__ import annotations

import ipaddress

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from rlm_wire.serving import VIEWER_PORT


class ViewerSettings(BaseSettings):
    """How `rlm view` listens and bounds what it reads; each variable is `RLM_VIEW_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="RLM_VIEW_", frozen=True, extra="ignore")

    host: str = Field("127.0.0.1", description="Interface `rlm view` listens on.")
    port: int = Field(
        VIEWER_PORT, ge=0, le=65535, description="Port of `rlm view` (0: any free one)."
    )
    token: SecretStr | None = Field(
        None,
        description="Token the viewer asks for (bearer header, or `?token=` once, which sets "
        "a cookie). Unset: no token, allowed only on a loopback host, and only requests naming "
        "a loopback host are answered (DNS rebinding).",
    )
    page_size: int = Field(
        50, ge=1, le=1000, description="Runs per page of the list (a request's `limit` cap)."
    )
    max_files: int = Field(
        10_000,
        ge=1,
        le=1_000_000,
        description="Trajectory files looked at per listing, newest first; older ones are "
        "left out (the list says so).",
    )
    max_file_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1024,
        description="Bytes read of one trajectory file; the rest is left out (marked truncated).",
    )
    max_run_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024,
        description="Bytes read over all the files of one run shown as a tree.",
    )
    max_field_chars: int = Field(
        100_000,
        ge=100,
        description="A text field of an event (reply, code, output) is cut to this many "
        "characters in the viewer's answers.",
    )

    def check(self) -> None:
        """Raise ValueError when the settings cannot be served safely."""
        if self.token is None and not is_loopback(self.host):
            raise ValueError(
                f"rlm view on {self.host} would show tenants' prompts to anyone: set "
                "RLM_VIEW_TOKEN, or listen on 127.0.0.1"
            )
        if self.token is not None and len(self.token.get_secret_value()) < 16:
            raise ValueError("RLM_VIEW_TOKEN must be at least 16 characters")


def is_loopback(host: str) -> bool:
    """A host name or address that only this machine reaches."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
