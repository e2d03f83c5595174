"""Drive the real, unmodified atoma-sdk 0.1.3 from tests (run by `.venv-atoma/bin/python`).

The SDK pins pydantic<2.11 and the node needs >=2.12, so the SDK lives in its own venv and
tests talk to it through this script (see `tests/atoma.py` for the importable helper). Only
the SDK's own code encrypts, decrypts and speaks HTTP; the one test double is the answer to
the node-lock call in `encrypt`, which is network, not crypto.

Every command writes JSON to stdout (one object, or JSON lines for streams) and exits 0 when
it ran to the end, whatever the SDK concluded: an SDK refusal is reported as
`{"ok": false, ...}`. A non-zero exit status means a usage error or a bug in this driver
(message and traceback on stderr).

Commands
--------
encrypt      stdin {"node_public_key": b64, "model": str,
                    "kind": "chat" | "chat_stream" | "embeddings" | "images"   (default "chat"),
                    "params": {...}   fields of the SDK request model: for chat
                                      `messages` (default one user message "Hello"),
                                      `max_tokens`, `temperature`, ...; for embeddings `input`;
                                      for images `prompt` (default "Hello"), `n`, `size`, ...
                    "stack_small_id": int (default 0), "node_small_id": int (default 1)}
             Calls `atoma_sdk.crypto_utils.encrypt_message` with an `AtomaSDK` whose HTTP
             client is an httpx.MockTransport answering POST /v1/nodes/lock with that key.
             stdout {"ok": true, "request": {outer JSON as sent}, "body": "<exact wire JSON>",
                     "plaintext": "<the exact string the SDK encrypted>",
                     "client_private_key": hex, "client_public_key": b64,
                     "salt": b64, "salt_hex": hex, "lock_request": {body of the lock call}}

decrypt      stdin {"client_private_key": hex, "node_public_key": b64, "salt": b64 (or
                    "salt_hex": hex), "response": {ciphertext, nonce, response_hash?, ...},
                    "stream_event": false}
             Parses `response` the way the SDK parses a body (`utils.unmarshal_json` into
             `ConfidentialComputeResponse`; with "stream_event": true it is wrapped as the SDK's
             SSE decoder does, `{"data": response}` into `ConfidentialComputeStreamResponse`) and
             calls `crypto_utils.decrypt_message`, which checks `response_hash` when present.
             stdout {"ok": true, "plaintext": str, "plaintext_b64": b64} or
                    {"ok": false, "error": str}

chat         --url URL [--token T] [--model M] [--prompt P] [--max-tokens N] [--temperature F]
             [--seed N] [--stream] [--async] [--timeout-ms N] [--header NAME=VALUE ...]
             [--ca-file PEM]
             Real SDK client: `AtomaSDK(bearer_auth=T, server_url=URL)` then
             `confidential_chat.create` / `create_stream` / `create_async` /
             `create_stream_async`. The SDK first calls POST URL/v1/nodes/lock for the key.
             Non-stream stdout: one object {"ok": true, "response": ChatCompletionResponse as
             JSON, "content": first choice's message content}.
             Stream stdout: JSON lines, one {"chunk": ChatCompletionChunk as JSON} per chunk
             the SDK yielded (it skips chunks with empty `choices`), then one summary line
             {"ok": true, "done": true, "chunks": n, "content": concatenated deltas}.
             On failure the last (or only) line is {"ok": false, "error_type": str,
             "error": str, "status_code": int | null, "body": str | null}.
             --ca-file (every client command): an https:// node whose certificate is in that
             PEM file, given to the SDK as httpx clients with `verify=` that certificate.

embeddings   --url URL [--token T] [--model M] [--input TEXT ...] [--async] [--timeout-ms N]
             [--header NAME=VALUE ...]
             `confidential_embeddings.create` / `create_async`.
             stdout {"ok": true, "response": CreateEmbeddingResponse as JSON,
                     "dimensions": len of the first vector} or the error object above.

images       --url URL [--token T] [--model M] [--prompt P] [--n N] [--size WxH]
             [--response-format F] [--async] [--timeout-ms N] [--header NAME=VALUE ...]
             `confidential_images.generate` / `generate_async`.
             stdout {"ok": true, "response": CreateImageResponse as JSON} or the error object.

lock         --url URL [--token T] [--model M]
             `nodes.nodes_create_lock` against the node: {"ok": true, "response": {...}}.

atoma-sdk 0.1.3 has no confidential (text) completions client (`confidential_completions`
does not exist in it), so there is no `completions` command; only chat and embeddings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import ssl
import sys
import traceback
from typing import Any

import httpx
from atoma_sdk import AtomaSDK, crypto_utils, models, utils
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

DEFAULT_MODEL = "test-model"


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _dump(model: Any) -> Any:
    """An SDK pydantic model as plain JSON data (its own serializer drops UNSET fields)."""
    return json.loads(utils.marshal_json(model, type(model)))


def _error(exc: BaseException) -> dict[str, Any]:
    body = getattr(exc, "body", None)
    return {
        "ok": False,
        "error_type": type(exc).__name__,
        "error": getattr(exc, "message", None) or str(exc),
        "status_code": getattr(exc, "status_code", None),
        "body": body if isinstance(body, str) or body is None else str(body),
    }


def _read_stdin() -> dict[str, Any]:
    data = json.loads(sys.stdin.read() or "{}")
    if not isinstance(data, dict):
        raise SystemExit("stdin must be a JSON object")
    return data


# --- encrypt / decrypt: the SDK's crypto path, no network ------------------------------------


def cmd_encrypt(spec: dict[str, Any]) -> dict[str, Any]:
    node_public_key = spec["node_public_key"]
    model = spec.get("model", DEFAULT_MODEL)
    kind = spec.get("kind", "chat")
    params = dict(spec.get("params") or {})
    lock_requests: list[Any] = []

    def lock_handler(request: httpx.Request) -> httpx.Response:
        # The test double for the network call only: the proxy/node answering the lock.
        if request.method != "POST" or request.url.path != "/v1/nodes/lock":
            return httpx.Response(404, json={"error": {"code": "NOT_FOUND", "message": "mock"}})
        lock_requests.append(json.loads(request.content or b"null"))
        return httpx.Response(
            200,
            json={
                "public_key": node_public_key,
                "node_small_id": spec.get("node_small_id", 1),
                "stack_entry_digest": None,
                "stack_small_id": spec.get("stack_small_id", 0),
            },
        )

    sdk = AtomaSDK(
        bearer_auth="driver",
        server_url="http://node.invalid",
        client=httpx.Client(transport=httpx.MockTransport(lock_handler)),
    )
    if kind in ("chat", "chat_stream"):
        params.setdefault("messages", [{"role": "user", "content": "Hello"}])
        messages = utils.get_pydantic_model(params.pop("messages"), list[models.ChatCompletionMessage])
        cls = models.CreateChatCompletionRequest if kind == "chat" else models.CreateChatCompletionStreamRequest
        body = cls(model=model, messages=messages, **params)
    elif kind == "embeddings":
        params.setdefault("input", "Hello")
        body = models.CreateEmbeddingRequest(model=model, **params)
    elif kind == "images":
        params.setdefault("prompt", "Hello")
        body = models.CreateImageRequest(model=model, **params)
    else:
        raise SystemExit(f"unknown kind {kind!r}")

    client_key = X25519PrivateKey.generate()
    _node_key, salt, request = crypto_utils.encrypt_message(sdk, client_key, body, model)
    # The exact body the SDK's chat client would send (same serializer call as confidential_chat).
    wire = utils.serialize_request_body(request, False, False, "json", models.ConfidentialComputeRequest)
    return {
        "ok": True,
        "request": json.loads(wire.content),
        "body": wire.content,
        # encrypt_message encrypts request_body.model_dump_json(); recomputed here for the test.
        "plaintext": body.model_dump_json(),
        "client_private_key": client_key.private_bytes_raw().hex(),
        "client_public_key": base64.b64encode(
            client_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        ).decode(),
        "salt": base64.b64encode(salt).decode(),
        "salt_hex": salt.hex(),
        "lock_request": lock_requests[0] if lock_requests else None,
    }


def cmd_decrypt(spec: dict[str, Any]) -> dict[str, Any]:
    client_key = X25519PrivateKey.from_private_bytes(bytes.fromhex(spec["client_private_key"]))
    node_key = X25519PublicKey.from_public_bytes(base64.b64decode(spec["node_public_key"]))
    salt = bytes.fromhex(spec["salt_hex"]) if "salt_hex" in spec else base64.b64decode(spec["salt"])
    try:
        if spec.get("stream_event"):
            wrapped = utils.unmarshal_json(json.dumps({"data": spec["response"]}), models.ConfidentialComputeStreamResponse)
            message = wrapped.data
        else:
            message = utils.unmarshal_json(json.dumps(spec["response"]), models.ConfidentialComputeResponse)
        plaintext = crypto_utils.decrypt_message(client_key, node_key, salt, message)
    except Exception as exc:  # the SDK reports every failure as ValueError / validation error
        return {"ok": False, "error_type": type(exc).__name__, "error": str(exc)}
    return {
        "ok": True,
        "plaintext": plaintext.decode("utf-8", errors="replace"),
        "plaintext_b64": base64.b64encode(plaintext).decode(),
    }


# --- chat / embeddings / lock: the real client against a node URL ----------------------------


def _sdk(args: argparse.Namespace) -> AtomaSDK:
    """The SDK as a user builds it; with --ca-file its httpx clients trust that certificate
    (the SDK takes ready-made clients: nothing in it changes)."""
    if not args.ca_file:
        return AtomaSDK(bearer_auth=args.token or None, server_url=args.url)
    trusted = ssl.create_default_context(cafile=args.ca_file)
    return AtomaSDK(
        bearer_auth=args.token or None,
        server_url=args.url,
        client=httpx.Client(verify=trusted),
        async_client=httpx.AsyncClient(verify=trusted),
    )


def _headers(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--header wants NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def _chat_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "model": args.model,
        "messages": [{"role": "user", "content": args.prompt}],
        "http_headers": _headers(args.header),
    }
    if args.max_tokens is not None:
        kwargs["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        kwargs["temperature"] = args.temperature
    if args.seed is not None:
        kwargs["seed"] = args.seed
    if args.timeout_ms is not None:
        kwargs["timeout_ms"] = args.timeout_ms
    return kwargs


def _chunk_text(chunk: Any) -> str:
    data = _dump(chunk.data)
    parts = []
    for choice in data.get("choices") or []:
        delta = choice.get("delta") or {}
        if isinstance(delta.get("content"), str):
            parts.append(delta["content"])
    return "".join(parts)


def _response_content(data: dict[str, Any]) -> Any:
    choices = data.get("choices") or []
    return (choices[0].get("message") or {}).get("content") if choices else None


async def _chat_async(client: AtomaSDK, args: argparse.Namespace) -> None:
    kwargs = _chat_kwargs(args)
    if not args.stream:
        data = _dump(await client.confidential_chat.create_async(**kwargs))
        _emit({"ok": True, "response": data, "content": _response_content(data)})
        return
    stream = await client.confidential_chat.create_stream_async(**kwargs)
    count, text = 0, []
    async with stream:
        async for chunk in stream:
            count += 1
            text.append(_chunk_text(chunk))
            _emit({"chunk": _dump(chunk.data)})
    _emit({"ok": True, "done": True, "chunks": count, "content": "".join(text)})


def cmd_chat(args: argparse.Namespace) -> None:
    with _sdk(args) as client:
        count, text = 0, []
        try:
            if args.use_async:
                asyncio.run(_chat_async(client, args))
                return
            kwargs = _chat_kwargs(args)
            if not args.stream:
                data = _dump(client.confidential_chat.create(**kwargs))
                _emit({"ok": True, "response": data, "content": _response_content(data)})
                return
            with client.confidential_chat.create_stream(**kwargs) as stream:
                for chunk in stream:
                    count += 1
                    text.append(_chunk_text(chunk))
                    _emit({"chunk": _dump(chunk.data)})
            _emit({"ok": True, "done": True, "chunks": count, "content": "".join(text)})
        except Exception as exc:
            _emit(_error(exc))


def cmd_embeddings(args: argparse.Namespace) -> None:
    inputs: Any = args.input or ["Hello"]
    if len(inputs) == 1:
        inputs = inputs[0]
    kwargs: dict[str, Any] = {"model": args.model, "input": inputs, "http_headers": _headers(args.header)}
    if args.timeout_ms is not None:
        kwargs["timeout_ms"] = args.timeout_ms
    with _sdk(args) as client:
        try:
            if args.use_async:
                result = asyncio.run(client.confidential_embeddings.create_async(**kwargs))
            else:
                result = client.confidential_embeddings.create(**kwargs)
        except Exception as exc:
            _emit(_error(exc))
            return
        data = _dump(result)
        vectors = data.get("data") or []
        dims = len(vectors[0].get("embedding") or []) if vectors else 0
        _emit({"ok": True, "response": data, "dimensions": dims})


def cmd_images(args: argparse.Namespace) -> None:
    kwargs: dict[str, Any] = {"model": args.model, "prompt": args.prompt, "http_headers": _headers(args.header)}
    for name in ("n", "size", "response_format", "timeout_ms"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    with _sdk(args) as client:
        try:
            if args.use_async:
                result = asyncio.run(client.confidential_images.generate_async(**kwargs))
            else:
                result = client.confidential_images.generate(**kwargs)
        except Exception as exc:
            _emit(_error(exc))
            return
        _emit({"ok": True, "response": _dump(result)})


def cmd_lock(args: argparse.Namespace) -> None:
    with _sdk(args) as client:
        try:
            _emit({"ok": True, "response": _dump(client.nodes.nodes_create_lock(model=args.model))})
        except Exception as exc:
            _emit(_error(exc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("encrypt", help="seal a request with the SDK's encrypt_message (JSON on stdin)")
    sub.add_parser("decrypt", help="open a response with the SDK's decrypt_message (JSON on stdin)")

    def client_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--url", required=True, help="node base URL, e.g. http://127.0.0.1:8080")
        p.add_argument("--token", default=None, help="bearer token (none: no Authorization header)")
        p.add_argument("--model", default=DEFAULT_MODEL)
        p.add_argument("--timeout-ms", type=int, default=None)
        p.add_argument("--header", action="append", help="extra request header NAME=VALUE (repeatable)")
        p.add_argument("--async", dest="use_async", action="store_true", help="use the SDK's async methods")
        p.add_argument("--ca-file", help="trust this PEM certificate for https:// URLs (httpx verify=)")
        return p

    chat = client_parser("chat", "confidential chat completion through the real SDK client")
    chat.add_argument("--prompt", default="Hello")
    chat.add_argument("--max-tokens", type=int, default=None)
    chat.add_argument("--temperature", type=float, default=None)
    chat.add_argument("--seed", type=int, default=None)
    chat.add_argument("--stream", action="store_true")
    emb = client_parser("embeddings", "confidential embeddings through the real SDK client")
    emb.add_argument("--input", action="append", help="input text (repeat for a batch)")
    images = client_parser("images", "confidential image generation through the real SDK client")
    images.add_argument("--prompt", default="Hello")
    images.add_argument("--n", type=int, default=None)
    images.add_argument("--size", default=None)
    images.add_argument("--response-format", default=None)
    client_parser("lock", "POST /v1/nodes/lock through the SDK")

    args = parser.parse_args(argv)
    try:
        if args.command == "encrypt":
            _emit(cmd_encrypt(_read_stdin()))
        elif args.command == "decrypt":
            _emit(cmd_decrypt(_read_stdin()))
        elif args.command == "chat":
            cmd_chat(args)
        elif args.command == "embeddings":
            cmd_embeddings(args)
        elif args.command == "images":
            cmd_images(args)
        elif args.command == "lock":
            cmd_lock(args)
    except SystemExit:
        raise
    except Exception:
        traceback.print_exc()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
