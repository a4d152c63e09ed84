"""The HTTP API over a user's own data: threads, their messages and their event log.
Authenticated by `Authorization: Bearer <jwt>`; another user's thread is a plain 404.

No `from __future__ import annotations` here: FastAPI must see the real `Annotated` objects of
the closures' parameters, which string annotations would hide.
"""

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request

from parley.auth import Authenticator
from parley.errors import ParleyError
from parley.protocol import MAX_SEQ, Identifier
from parley.store import queries
from parley.store.db import Database

MAX_EVENTS_PAGE = 1000


def build_router(*, authenticator: Authenticator, db: Database) -> APIRouter:
    async def current_user(request: Request) -> str:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HTTPException(401, "missing bearer token", {"WWW-Authenticate": "Bearer"})
        try:
            identity = await authenticator.authenticate(token.strip())
        except ParleyError as exc:
            raise HTTPException(401, exc.message, {"WWW-Authenticate": "Bearer"}) from None
        return identity.user_id

    User = Annotated[str, Depends(current_user)]
    # The same bounds as on the WebSocket: no NUL, no lone surrogate, at most 64 characters.
    ThreadId = Annotated[Identifier, Path()]
    router = APIRouter(prefix="/api")

    async def owned_thread(user_id: str, thread_id: str) -> None:
        async with db.read() as session:
            if await queries.get_thread(session, user_id=user_id, thread_id=thread_id) is None:
                raise HTTPException(404, "thread not found")

    @router.get("/threads")
    async def list_threads(user_id: User) -> dict[str, Any]:
        async with db.read() as session:
            threads = await queries.list_threads(session, user_id=user_id)
        return {
            "threads": [
                {
                    "id": t.id,
                    "title": t.title,
                    "last_seq": t.last_seq,
                    "created_at": t.created_at.isoformat(),
                    "updated_at": t.updated_at.isoformat(),
                }
                for t in threads
            ]
        }

    @router.get("/threads/{thread_id}/messages")
    async def list_messages(thread_id: ThreadId, user_id: User) -> dict[str, Any]:
        await owned_thread(user_id, thread_id)
        async with db.read() as session:
            messages = await queries.list_messages(session, thread_id=thread_id)
        return {
            "thread_id": thread_id,
            "messages": [
                {
                    "id": m.id,
                    "role": m.role,
                    "content": m.content,
                    "run_id": m.run_id,
                    "client_message_id": m.client_message_id,
                    "created_at": m.created_at.isoformat(),
                }
                for m in messages
            ],
        }

    @router.get("/threads/{thread_id}/events")
    async def list_events(
        thread_id: ThreadId,
        user_id: User,
        after_seq: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
        limit: Annotated[int, Query(ge=1, le=MAX_EVENTS_PAGE)] = MAX_EVENTS_PAGE,
    ) -> dict[str, Any]:
        await owned_thread(user_id, thread_id)
        async with db.read() as session:
            events = await queries.events_after(
                session, thread_id=thread_id, after_seq=after_seq, limit=limit
            )
        return {"thread_id": thread_id, "events": [json.loads(e.frame) for e in events]}

    return router
