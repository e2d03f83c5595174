"""`Client`: the synchronous face of ConfidentialClient, on its own event loop in a thread."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections.abc import Coroutine, Iterator
from typing import Any, Generic, TypeVar

from ._async import AsyncStream, ConfidentialClient
from .credentials.privacy_pass import Wallet
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CreateEmbeddingResponse,
    ImagesResponse,
    ModelList,
    NodeIdentity,
)

T = TypeVar("T")
R = TypeVar("R")


class _LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="tee-node-client", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, R]) -> R:
        if not self._thread.is_alive():
            coro.close()
            raise RuntimeError("client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join()
        if not self.loop.is_closed():
            self.loop.close()


class Stream(Generic[T]):
    """A verified stream: `for chunk in stream`; `.receipt` once it ended (see AsyncStream)."""

    def __init__(self, loop: _LoopThread, inner: AsyncStream) -> None:
        self._loop = loop
        self._inner = inner
        self._iterator = None

    def __iter__(self) -> Iterator[T]:
        iterator = self._inner.__aiter__()

        async def step() -> Any:
            return await iterator.__anext__()

        try:
            while True:
                try:
                    yield self._loop.run(step())
                except StopAsyncIteration:
                    return
        finally:
            self._loop.run(iterator.aclose())

    @property
    def receipt(self):
        return self._inner.receipt

    @property
    def usage(self):
        return self._inner.usage

    @property
    def attestation(self) -> NodeIdentity:
        return self._inner.attestation

    @property
    def completed(self) -> bool:
        return self._inner.completed

    @property
    def request_id(self) -> str | None:
        return self._inner.request_id

    def close(self) -> None:
        self._loop.run(self._inner.aclose())

    def __enter__(self) -> Stream[T]:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class _ChatCompletions:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(
        self, *, model: str, messages: list[dict[str, Any]], stream: bool = False, **params: Any
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        return self._client._wrap(
            self._client._async.chat.completions.create(model=model, messages=messages, stream=stream, **params)
        )


class _Chat:
    def __init__(self, client: Client) -> None:
        self.completions = _ChatCompletions(client)


class _Completions:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, *, model: str, prompt: Any, stream: bool = False, **params: Any) -> Completion | Stream[Completion]:
        return self._client._wrap(
            self._client._async.completions.create(model=model, prompt=prompt, stream=stream, **params)
        )


class _Embeddings:
    def __init__(self, client: Client) -> None:
        self._client = client

    def create(self, *, model: str, input: Any, **params: Any) -> CreateEmbeddingResponse:
        return self._client._loop.run(self._client._async.embeddings.create(model=model, input=input, **params))


class _Images:
    def __init__(self, client: Client) -> None:
        self._client = client

    def generate(self, *, model: str, prompt: str, **params: Any) -> ImagesResponse:
        return self._client._loop.run(self._client._async.images.generate(model=model, prompt=prompt, **params))


class _Models:
    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> ModelList:
        return self._client._loop.run(self._client._async.models.list())


class Client:
    """Synchronous ConfidentialClient (same arguments, same checks, same objects).

        with Client("http://127.0.0.1:8080", allow_simulated=True) as client:
            for chunk in client.chat.completions.create(model="m", messages=[...], stream=True):
                print(chunk.choices[0].delta.content or "", end="")
    """

    def __init__(self, base_url: str, **kwargs: Any) -> None:
        self._loop = _LoopThread()
        self._finalizer = weakref.finalize(self, self._loop.stop)  # a forgotten client frees its thread
        try:
            self._async = ConfidentialClient(base_url, **kwargs)
        except BaseException:
            self._loop.stop()
            raise
        self.chat = _Chat(self)
        self.completions = _Completions(self)
        self.embeddings = _Embeddings(self)
        self.images = _Images(self)
        self.models = _Models(self)

    def _wrap(self, coro: Coroutine[Any, Any, Any]) -> Any:
        result = self._loop.run(coro)
        return Stream(self._loop, result) if isinstance(result, AsyncStream) else result

    @property
    def attestation(self) -> NodeIdentity | None:
        return self._async.attestation

    @property
    def policy(self) -> Any:
        return self._async.policy

    @property
    def key_exchange(self) -> str | None:
        return self._async.key_exchange

    def attest(self) -> NodeIdentity:
        return self._loop.run(self._async.attest())

    def fetch_tokens(self, api_key: str, count: int, wallet: Wallet) -> int:
        return self._loop.run(self._async.fetch_tokens(api_key, count, wallet))

    def close(self) -> None:
        try:
            self._loop.run(self._async.aclose())
        except RuntimeError:
            pass
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self._async.base_url!r})"


__all__ = ["Client", "Stream"]
