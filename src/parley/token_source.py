"""Where `parley chat` gets a fresh token, and when: a shell command (`--token-command`, e.g.
an auth service's CLI) or, in development, the generated secret. A token is renewed when half
its remaining life is gone, and at the latest a minute before it expires."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Callable

from parley.auth import mint_token

RENEW_AT_LATEST_S = 60.0

# A fresh token; raises RenewFailed.
TokenSource = Callable[[], Awaitable[str]]


class RenewFailed(Exception):
    """No new token could be obtained; the message says why."""


def renew_in(left_s: float) -> float:
    """Seconds from now to renew a token that expires in `left_s`: with time to spare for a
    slow token source, and not needlessly often for a short-lived token."""
    return max(0.0, left_s / 2, left_s - RENEW_AT_LATEST_S)


def from_command(command: str, timeout_s: float = 30.0) -> TokenSource:
    async def token() -> str:
        return await command_token(command, timeout_s)

    return token


def minted(secret: str, user_id: str, ttl_s: int = 86400) -> TokenSource:
    async def token() -> str:
        return mint_token(secret=secret, user_id=user_id, ttl_s=ttl_s)

    return token


async def command_token(command: str, timeout_s: float = 30.0) -> str:
    """The token that `command` (a shell command line, e.g. an auth service's CLI) prints."""
    # subprocess.run in a worker thread: its timeout and clean-up of a hung command are
    # simpler to get right than with asyncio's subprocesses.
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            command,
            shell=True,
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise RenewFailed(f"{command!r} did not finish within {timeout_s:g} s") from None
    except OSError as exc:
        raise RenewFailed(f"{command!r} could not run: {exc}") from None
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["nothing"]
        raise RenewFailed(f"{command!r} exited with {done.returncode}: {said[0]}")
    token = done.stdout.decode(errors="replace").strip()
    if not token or len(token.split()) != 1:
        raise RenewFailed(f"{command!r} did not print one token")
    return token
