"""The `parley` command: serve, check, token, migrate.

Exit codes: 0 success; 1 startup or check failed; 2 usage error (Typer's).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Annotated

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from parley import __version__, fdlimit, gc_settings, redact
from parley.app import ParleyServer, create_app, drain
from parley.auth import development_secret, mint_token
from parley.config import Settings
from parley.health import ServingState
from parley.observability import configure_logging
from parley.startup import PHASES, PhaseResult, StartupError, start
from parley.ws_protocol import HttpProtocol, WebSocketProtocol

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Parley: real-time AI agent chat."
)
err = Console(stderr=True)
out = Console()


def _settings(**overrides: object) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in first["loc"]).upper()
        err.print(
            f"startup failed in phase settings: {field}: {first['msg']} — fix the environment "
            "variable (see README.md)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from None


def _run(coro: object) -> int:
    try:
        import uvloop

        return int(uvloop.run(coro))  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return int(asyncio.run(coro))  # type: ignore[arg-type]


def _phase_table(results: list[PhaseResult], title: str = "startup phases") -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("phase")
    table.add_column("status")
    table.add_column("ms", justify="right")
    table.add_column("detail", overflow="fold")
    colours = {"ok": "green", "failed": "red"}
    for r in results:
        colour = colours.get(r.status, "dim")
        table.add_row(r.name, f"[{colour}]{r.status}[/]", str(r.duration_ms), r.detail)
    return table


def _report_failure(error: StartupError) -> None:
    # The first line is plain text so that log collectors and tests can match it exactly.
    err.print(error.line(), markup=False, highlight=False, soft_wrap=True)
    err.print(_phase_table(error.results or [PhaseResult(p.name) for p in PHASES]))


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to bind (HOST)")] = None,
    port: Annotated[int | None, typer.Option(help="Port to bind (PORT)")] = None,
) -> None:
    """Run every startup phase, then serve HTTP and WebSocket until SIGTERM/SIGINT."""
    settings = _settings(host=host, port=port)
    configure_logging(level=settings.log_level, fmt=settings.effective_log_format)
    redact.install()
    raise typer.Exit(_run(_serve(settings)))


async def _serve(settings: Settings) -> int:
    try:
        components, results = await start(settings)
    except StartupError as error:
        _report_failure(error)
        return 1
    # Raised (and logged) once startup has passed: a failed startup's first line stays its
    # one-line reason, and startup itself needs few descriptors.
    fdlimit.raise_open_files_limit()
    if settings.effective_log_format == "console":
        # What passed, and how (e.g. whether the LLM was probed); JSON logs carry the same in
        # their `startup.complete` line, and a table would break their one-object-a-line shape.
        err.print(_phase_table(results))
    state = ServingState()
    config = uvicorn.Config(
        create_app(components, state),
        host=settings.host,
        port=settings.port,
        # Larger than Parley's own cap, so an oversized frame gets the protocol's error frame
        # and close 1009 from Parley; frames beyond this are refused by the library itself.
        ws_max_size=max(settings.max_message_bytes * 4, 1 << 20),
        # No protocol-level pings from the server: Parley's own heartbeat (`ping` frames, close
        # 4408) and its send queue (close 1013) decide when a silent or stalled client is
        # closed. uvicorn's keepalive would otherwise close a client that stops reading with
        # 1011 "keepalive ping timeout", a code the protocol reserves for internal errors.
        ws_ping_interval=None,
        ws_ping_timeout=None,
        # No permessage-deflate: frames are small JSON, and compressing each streamed delta for
        # every connection costs CPU on the hot path for a few bytes saved (bench/README.md).
        ws_per_message_deflate=False,
        # uvicorn's sans-I/O WebSocket protocol, able to write a frame without a task wake-up,
        # and its httptools HTTP protocol, freed by reference counting once it upgraded.
        ws=WebSocketProtocol,
        http=HttpProtocol,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=5,
        server_header=False,
    )
    server = ParleyServer(
        config, drain=lambda: drain(components, state), hurry=components.supervisor.hurry_drain
    )
    if settings.environment.value == "development" and settings.jwt_secret is None:
        token = mint_token(secret=development_secret(settings.data_dir), user_id="dev", ttl_s=86400)
        err.print(
            f"\nParley {__version__} (development) on http://{settings.host}:{settings.port}\n"
            f"  Chat page (signs in as 'dev'): "
            f"http://{settings.host}:{settings.port}/#token={token}\n"
            f"  WebSocket: ws://{settings.host}:{settings.port}/ws\n"
            f"  Token for user 'dev' (24 h): {token}\n",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    gc_settings.tune_for_serving()
    try:
        await server.serve()
    finally:
        await components.close()
    return 0 if server.started else 1


@app.command()
def check(
    llm_probe: Annotated[
        bool, typer.Option("--llm-probe", help="Also send one small request to the LLM")
    ] = False,
) -> None:
    """Run the startup phases against the real dependencies, print the table, exit 0 if all pass."""
    settings = _settings()
    configure_logging(level="WARNING", fmt=settings.effective_log_format)
    raise typer.Exit(_run(_check(settings, llm_probe)))


async def _check(settings: Settings, llm_probe: bool) -> int:
    try:
        components, results = await start(settings)
    except StartupError as error:
        _report_failure(error)
        return 1
    code = 0
    try:
        if llm_probe:
            probe = PhaseResult("llm_probe")
            loop = asyncio.get_running_loop()
            started = loop.time()
            try:
                async with asyncio.timeout(settings.llm_timeout_s + 5):
                    text = await components.llm.probe()
                probe.status, probe.detail = "ok", f"{components.llm.display_name}: {text[:40]!r}"
            except Exception as exc:
                probe.status, probe.detail = "failed", f"{type(exc).__name__}: {exc}"[:200]
                code = 1
            probe.duration_ms = int((loop.time() - started) * 1000)
            results.append(probe)
    finally:
        await components.close()
    if code:
        failed = next(r for r in results if r.status == "failed")
        err.print(
            f"check failed in phase {failed.name}: {failed.detail}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    out.print(_phase_table(results, "parley check"))
    return code


@app.command()
def token(
    user: Annotated[str, typer.Option("--user", help="The user id (JWT 'sub')")],
    ttl: Annotated[int, typer.Option("--ttl", min=1, help="Lifetime in seconds")] = 86400,
) -> None:
    """Mint a development token signed with JWT_SECRET (or the generated development secret)."""
    settings = _settings()
    if settings.jwt_secret is not None:
        secret = settings.jwt_secret.get_secret_value()
    elif settings.environment.is_deployed:
        err.print("JWT_SECRET is not set; tokens in staging/production come from your auth service")
        raise typer.Exit(1)
    else:
        secret = development_secret(settings.data_dir)
    sys.stdout.write(
        mint_token(
            secret=secret,
            user_id=user,
            ttl_s=ttl,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
        )
        + "\n"
    )


@app.command()
def migrate() -> None:
    """Create or upgrade the database schema to the newest revision."""
    settings = _settings()
    configure_logging(level="WARNING", fmt=settings.effective_log_format)
    raise typer.Exit(_run(_migrate(settings)))


async def _migrate(settings: Settings) -> int:
    from parley.store.db import Database

    db = Database(settings.effective_database_url)
    try:
        if db.sqlite_path is not None:
            db.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        await db.migrate()
        out.print(f"database at revision {await db.current_revision()}")
        return 0
    except Exception as exc:
        err.print(f"migration failed: {type(exc).__name__}: {exc}", markup=False)
        return 1
    finally:
        await db.close()


@app.command()
def chat(
    url: Annotated[str | None, typer.Option(help="WebSocket URL of a Parley server")] = None,
    token: Annotated[
        str | None, typer.Option(help="JWT; in development one is minted for user 'dev'")
    ] = None,
    thread: Annotated[str | None, typer.Option(help="Continue this thread id")] = None,
    token_command: Annotated[
        str | None,
        typer.Option(
            help="A shell command that prints a fresh JWT; run at start and again to renew the "
            "token before it expires"
        ),
    ] = None,
) -> None:
    """Chat in the terminal: the agent's thinking, tool calls and answer, live."""
    from parley.chat import ChatClient
    from parley.token_source import TokenSource, from_command, minted

    settings = _settings()
    renew: TokenSource | None = None
    if token_command is not None:
        if token is not None:
            err.print("give --token or --token-command, not both")
            raise typer.Exit(2)
        renew = from_command(token_command)
    elif token is None:
        if settings.environment.is_deployed or settings.jwt_secret is not None:
            err.print("--token or --token-command is required (a JWT from your auth service)")
            raise typer.Exit(2)
        renew = minted(development_secret(settings.data_dir), user_id="dev")
    client = ChatClient(
        url=url or f"ws://{settings.host}:{settings.port}/ws",
        token=token,
        thread_id=thread,
        console=Console(),
        renew=renew,
    )
    raise typer.Exit(_run(client.run()))


@app.command()
def version() -> None:
    """Print Parley's version."""
    out.print(__version__)


def main() -> None:
    app()
