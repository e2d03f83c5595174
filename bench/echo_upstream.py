"""An instant OpenAI-compatible echo server: the upstream of bench/server.py's upstream mode.

The least an upstream can do per request, so that what the node's UpstreamEngine costs in
front of it shows: HTTP/1.1 keep-alive on a bare asyncio protocol (uvloop), the body parsed
with orjson, the answer built from the last user message (its words echoed back, as the echo
engine does), `/health` and `/v1/models` for the node's poller. Streams are written at once:
one chunk per word, the usage chunk, `[DONE]`. Run:
    .venv/bin/python bench/echo_upstream.py --port PORT [--model NAME]
"""

from __future__ import annotations

import argparse
import asyncio
import time

import orjson
import uvloop

_OK = b"HTTP/1.1 200 OK\r\n"
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def _json_response(body: bytes) -> bytes:
    return _OK + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


class EchoUpstream(asyncio.Protocol):
    def __init__(self, model: str) -> None:
        self.model = model
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].split(b"\r\n")
            length = 0
            for line in head[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            method, path, _ = head[0].split(b" ", 2)
            assert self.transport is not None
            self.transport.write(self.answer(method, path, body))

    def answer(self, method: bytes, path: bytes, body: bytes) -> bytes:
        if method == b"GET" and path == b"/health":
            return _json_response(b"{}")
        if method == b"GET" and path == b"/v1/models":
            return _json_response(orjson.dumps({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "bench"}]}))
        if method == b"POST" and path == b"/v1/chat/completions":
            return self.chat(orjson.loads(body))
        return _NOT_FOUND

    def chat(self, request: dict) -> bytes:
        last_user = next((m for m in reversed(request["messages"]) if m.get("role") == "user"), {})
        words = str(last_user.get("content", "")).split()
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in request["messages"])
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words), "total_tokens": prompt_tokens + len(words)}
        created, chunk_id = int(time.time()), "chatcmpl-echo"
        if not request.get("stream"):
            message = {"role": "assistant", "content": " ".join(words)}
            return _json_response(orjson.dumps({
                "id": chunk_id, "object": "chat.completion", "created": created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage,
            }))  # fmt: skip
        events = []
        for index, word in enumerate(words):
            delta = {"role": "assistant", "content": word} if index == 0 else {"content": " " + word}
            choice = {"index": 0, "delta": delta, "finish_reason": "stop" if index == len(words) - 1 else None}
            chunk = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": self.model, "choices": [choice]}
            events.append(_chunked(b"data: " + orjson.dumps(chunk) + b"\n\n"))
        final = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": self.model, "choices": [], "usage": usage}
        events.append(_chunked(b"data: " + orjson.dumps(final) + b"\n\n"))
        events.append(_chunked(b"data: [DONE]\n\n"))
        head = _OK + b"Content-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + b"".join(events) + b"0\r\n\r\n"


async def serve(port: int, model: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: EchoUpstream(model), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model", default="echo")
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.model))


if __name__ == "__main__":
    main()
