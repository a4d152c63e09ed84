"""The local model's server process: llama-cpp-python's OpenAI-compatible server, plus the token
usage of streamed answers, which that server reports only for unstreamed ones.

Run by `LocalModelServer` as `python -m parley.local_model_server --model PATH ...` (in a child
process of its own; nothing else of Parley is imported here). A streamed chat completion ends
with one more chunk, the one OpenAI sends for `stream_options.include_usage`: no choices, and
`usage` with the tokens the model really processed — the prompt as the chat template rendered
and tokenized it, and the tokens it generated. Without it every local run would report zeros.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from typing import Any

import llama_cpp
import llama_cpp.server.app
import uvicorn
from llama_cpp import llama_chat_format
from llama_cpp.server.settings import ModelSettings, ServerSettings


def report_streamed_usage(llama: llama_cpp.Llama) -> None:
    """Make streamed chat completions of `llama` end with a usage chunk."""
    # The handler `Llama.create_chat_completion` would use: the same lookup llama-cpp-python's
    # own server makes to wrap it (for chat_template_kwargs).
    base: Callable[..., Any] = (
        llama.chat_handler
        or llama._chat_handlers.get(llama.chat_format or "")
        or llama_chat_format.get_chat_completion_handler(llama.chat_format or "")
    )
    create_completion = llama.create_completion
    # Shared by requests, which the server runs one at a time (its lock; no interruptions).
    prompt_tokens = [0]

    def counting_create_completion(prompt: str | list[int], **kwargs: Any) -> Any:
        # Every chat handler renders the messages and calls this with the prompt it evaluates.
        if isinstance(prompt, str):
            prompt_tokens[0] = len(llama.tokenize(prompt.encode("utf-8"), special=True))
        else:
            prompt_tokens[0] = len(prompt)
        return create_completion(prompt, **kwargs)

    def chat_handler(**kwargs: Any) -> Any:
        result = base(**kwargs)
        if not kwargs.get("stream"):
            return result  # an unstreamed answer carries its usage already
        return _with_usage(result, llama, prompt_tokens)

    # An instance attribute: this one Llama counts, the class and the library are unchanged.
    setattr(llama, "create_completion", counting_create_completion)  # noqa: B010
    llama.chat_handler = chat_handler


def _with_usage(
    chunks: Iterator[dict[str, Any]], llama: llama_cpp.Llama, prompt_tokens: list[int]
) -> Iterator[dict[str, Any]]:
    last: dict[str, Any] | None = None
    finish_reason = None
    for chunk in chunks:
        last = chunk
        if chunk["choices"]:
            finish_reason = chunk["choices"][0].get("finish_reason") or finish_reason
        yield chunk
    if last is None:
        return
    # The context now holds the prompt and every generated token the model evaluated: all of
    # them, except the last one when the answer was cut at max_tokens (sampled, never fed back).
    # The end-of-turn token is neither evaluated nor counted, as in llama.cpp's own usage.
    generated = llama.n_tokens - prompt_tokens[0] + (1 if finish_reason == "length" else 0)
    yield {
        "id": last["id"],
        "object": "chat.completion.chunk",
        "created": last["created"],
        "model": last["model"],
        "choices": [],
        "usage": {
            "prompt_tokens": prompt_tokens[0],
            "completion_tokens": generated,
            "total_tokens": prompt_tokens[0] + generated,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--model_alias", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--n_ctx", type=int, default=2048)
    parser.add_argument("--n_threads", type=int, default=1)
    args = parser.parse_args()
    app = llama_cpp.server.app.create_app(
        # By default a new request cancels the one being streamed (the second of two concurrent
        # runs would end the first with an empty answer): queue instead.
        server_settings=ServerSettings(host=args.host, port=args.port, interrupt_requests=False),
        model_settings=[
            ModelSettings(
                model=args.model,
                model_alias=args.model_alias,
                n_ctx=args.n_ctx,
                n_threads=args.n_threads,
                n_threads_batch=args.n_threads,
            )
        ],
    )
    # create_app has loaded the model into the server's one proxy.
    proxy = llama_cpp.server.app._llama_proxy
    assert proxy is not None
    report_streamed_usage(proxy(args.model_alias))
    uvicorn.run(app, host=args.host, port=args.port)


if __name__ == "__main__":
    main()
