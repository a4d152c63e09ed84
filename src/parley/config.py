"""Parley's configuration: one typed `Settings` object read once from the environment.

Nothing else in the package reads `os.environ`. Per-environment requirements (what staging and
production insist on) are checked in `Settings.problems()`, in one place, so that the startup
phase can report them all at once.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Environment(StrEnum):
    DEVELOPMENT = "development"
    TEST = "test"
    STAGING = "staging"
    PRODUCTION = "production"

    @property
    def is_deployed(self) -> bool:
        """Staging and production: no development conveniences, every secret explicit."""
        return self in (Environment.STAGING, Environment.PRODUCTION)


class LLMProvider(StrEnum):
    OPENAI = "openai"
    LOCAL = "local"


DEFAULT_DATA_DIR = Path("var")


class Settings(BaseSettings):
    """Every knob Parley has. Field names are the environment variable names, lower-cased."""

    # An empty variable (`LLM_PROVIDER=`) means unset, as operators expect.
    model_config = SettingsConfigDict(
        env_file=".env", extra="ignore", frozen=True, env_ignore_empty=True
    )

    environment: Environment = Environment.DEVELOPMENT
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    data_dir: Path = DEFAULT_DATA_DIR
    log_level: str = "INFO"
    log_format: str | None = Field(
        default=None, description="'json' or 'console'; json in staging/production by default"
    )

    # Storage and delivery.
    database_url: str | None = None
    redis_url: str | None = None
    # How long the event log holds a run's events in memory and retries while the database is
    # unreachable (a restart, a failover) before the run ends with `storage_unavailable`.
    database_outage_grace_s: float = Field(default=10.0, ge=0)
    # At most this many events wait in memory for the database during an outage; past it, runs
    # end with `storage_unavailable` rather than the process running out of memory.
    database_outage_backlog: int = Field(default=50_000, ge=1)
    # Group commit under load: while events arrive at DATABASE_COMMIT_BUSY_RATE a second or
    # more, the event log starts a transaction at most every DATABASE_COMMIT_SPACING_MS, so
    # that each holds more of them (store/group_commit.py). 0 ms never waits; a rate of 0 always
    # does.
    database_commit_spacing_ms: float = Field(default=10.0, ge=0, le=1000)
    database_commit_busy_rate: float = Field(default=2500.0, ge=0)
    # How long connections may be cut off from other instances' events (Redis unreachable)
    # before they are closed with 1013 so that clients reconnect and resume.
    event_bus_outage_grace_s: float = Field(default=10.0, ge=0)

    # Authentication.
    jwt_secret: SecretStr | None = None
    auth_service_url: str | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # Language model.
    llm_provider: LLMProvider | None = None
    llm_model: str | None = None
    llm_api_key: SecretStr | None = None
    llm_base_url: str | None = None
    llm_timeout_s: float = Field(default=30.0, gt=0)
    llm_max_retries: int = Field(default=1, ge=0, le=10)
    llm_circuit_failure_threshold: int = Field(default=5, ge=1)
    llm_circuit_reset_s: float = Field(default=30.0, gt=0)
    llm_max_tokens: int | None = Field(default=None, ge=1)
    llm_model_path: Path | None = None  # a GGUF file for LLM_PROVIDER=local
    # Probe the provider before startup passes: unset means on in staging/production and for
    # the local model, off otherwise ("off" for providers where every request costs money).
    llm_startup_probe: bool | None = None
    # Background probe feeding readiness; 0 turns it off (readiness then trusts the circuit).
    llm_probe_interval_s: float = Field(default=15.0, ge=0)

    # Transport limits.
    websocket_heartbeat_interval: float = Field(default=25.0, gt=0)
    max_message_bytes: int = Field(default=65536, ge=256)
    max_connections_per_user: int = Field(default=10, ge=1)
    send_queue_size: int = Field(default=1024, ge=8)

    # Supervisor limits.
    run_timeout_s: float = Field(default=120.0, gt=0)
    max_concurrent_runs: int = Field(default=256, ge=1)
    max_runs_per_user: int = Field(default=4, ge=1)
    rate_limit_per_minute: int = Field(default=60, ge=1)
    history_messages: int = Field(default=20, ge=0)

    # Instance leases (PostgreSQL): each instance renews its heartbeat every
    # INSTANCE_HEARTBEAT_S; one silent for INSTANCE_LEASE_S is dead and a peer ends its runs.
    instance_heartbeat_s: float = Field(default=2.0, gt=0)
    instance_lease_s: float = Field(default=10.0, gt=0)

    # Extension points: "package.module:name" of a list of tool functions / of AgentSpec.
    extra_tools: Annotated[list[str], NoDecode] = Field(default_factory=list)
    agents: str | None = None

    # Tools.
    tool_timeout_s: float = Field(default=10.0, gt=0)
    tool_result_max_bytes: int = Field(default=16384, ge=256)

    # Lifecycle.
    startup_timeout_s: float = Field(default=30.0, gt=0)
    shutdown_grace_s: float = Field(default=20.0, ge=0)

    @field_validator("allowed_origins", "extra_tools", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [origin.strip() for origin in value.split(",") if origin.strip()]
        return value

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite+aiosqlite:///{self.data_dir / 'parley.db'}"

    @property
    def effective_llm_provider(self) -> LLMProvider | None:
        """The configured provider; in development with none configured, the local model."""
        if self.llm_provider is None and self.environment is Environment.DEVELOPMENT:
            return LLMProvider.LOCAL
        return self.llm_provider

    @property
    def effective_llm_startup_probe(self) -> bool:
        if self.llm_startup_probe is not None:
            return self.llm_startup_probe
        return self.environment.is_deployed or self.effective_llm_provider is LLMProvider.LOCAL

    @property
    def effective_log_format(self) -> str:
        if self.log_format:
            return self.log_format
        return "json" if self.environment.is_deployed else "console"

    def problems(self) -> list[str]:
        """Configuration errors for this environment; empty when the settings are usable."""
        found: list[str] = []
        if self.environment.is_deployed:
            if not self.database_url:
                found.append(f"DATABASE_URL is required in {self.environment}")
            if not self.jwt_secret and not self.auth_service_url:
                found.append(f"JWT_SECRET or AUTH_SERVICE_URL is required in {self.environment}")
            if self.llm_provider is None:
                found.append(f"LLM_PROVIDER is required in {self.environment}")
        if self.llm_provider is LLMProvider.OPENAI:
            if not self.llm_model:
                found.append("LLM_MODEL is required when LLM_PROVIDER=openai")
            if not self.llm_base_url and not self.llm_api_key:
                found.append("LLM_API_KEY (or LLM_BASE_URL of a local endpoint) is required")
        if self.llm_base_url and not self.llm_base_url.startswith(("http://", "https://")):
            found.append(f"LLM_BASE_URL must be an http(s) URL, got {self.llm_base_url!r}")
        if self.auth_service_url and not self.auth_service_url.startswith(("http://", "https://")):
            found.append("AUTH_SERVICE_URL must be an http(s) URL")
        if self.instance_lease_s < 3 * self.instance_heartbeat_s:
            # Fewer than three heartbeats per lease: one slow renewal would look like a death.
            found.append("INSTANCE_LEASE_S must be at least 3 × INSTANCE_HEARTBEAT_S")
        secret = self.jwt_secret.get_secret_value() if self.jwt_secret is not None else None
        if secret is not None and len(secret) < 32 and self.environment.is_deployed:
            found.append("JWT_SECRET must be at least 32 characters")
        return found
