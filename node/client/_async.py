"""`ConfidentialClient`: attest the node, pin its keys, seal every request, verify every answer."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import hashlib
import json
import logging
import os
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import aiohttp
from pydantic import BaseModel, ValidationError
from yarl import URL

from attestation.errors import TlsCertificateMismatch

from ..envelope import OBFUSCATION_FIELD, ResponseOpener, seal_request
from ..errors import EventAfterEnd, ReceiptInvalid
from ..protocol import Receipt
from ..wire import SSE_DONE, EventTooLarge, SSEDecoder
from .errors import (
    APIConnectionError,
    APITimeoutError,
    DuplicateEvent,
    MalformedEvent,
    NodeAPIError,
    NotReadyError,
    OverloadedError,
    StaleNodeKeyError,
    UnexpectedResponse,
    UsageMismatch,
    error_from_body,
)
from .types import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CreateEmbeddingResponse,
    ModelList,
    NodeIdentity,
)

T = TypeVar("T", bound=BaseModel)
log = logging.getLogger("tee_node.client")

ATTESTATION_NONCE_SIZE = 32
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
USER_AGENT = "tee-node-client/0.1"


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def make_policy(
    policy: Any = None,
    *,
    allow_simulated: bool = False,
    expected_measurements: Any = None,
    allowed_tee: Any = None,
    require_gpu: bool = False,
) -> Any:
    """An `attestation.appraisal.Policy` from the constructor's shortcuts (or `policy` as is).

    `policy` may also be a path to a TOML policy file (docs/policy.md).
    """
    from attestation.appraisal import Policy, load_policy

    if policy is not None:
        if allow_simulated or expected_measurements is not None or allowed_tee is not None or require_gpu:
            raise ValueError("pass either policy= or the policy shortcuts, not both")
        return policy if isinstance(policy, Policy) else load_policy(policy)
    built = Policy(allow_simulated=allow_simulated, require_gpu=require_gpu)
    if expected_measurements is not None:
        built = built.with_measurements([expected_measurements] if isinstance(expected_measurements, str) else expected_measurements)
    if allowed_tee is not None:
        built = replace(built, allowed_tees=frozenset([allowed_tee] if isinstance(allowed_tee, str) else allowed_tee))
    return built


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(int(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def _public_url(url: str) -> str:
    """The URL as an error may show it: never a user name or password."""
    try:
        parsed = URL(url)
    except (ValueError, TypeError):
        return "(an unreadable URL)"
    return str(parsed.with_user(None)) if parsed.is_absolute() else url.rsplit("@", 1)[-1]


def _scheme_of(url: str) -> str:
    """http or https; any other URL is refused before anything is sent, with what to write instead."""
    parsed = urlsplit(url)
    if parsed.scheme in ("http", "https") and parsed.hostname:
        return parsed.scheme
    shown = _public_url(url)
    if not parsed.hostname:  # "localhost:8080" reads as scheme "localhost"
        raise APIConnectionError(url=shown, cause=f"not an http:// or https:// URL; did you mean http://{shown}?")
    raise APIConnectionError(url=shown, cause=f"the {parsed.scheme}:// scheme is not supported; use http:// or https://")


def unreachable(url: str, exc: BaseException, timeout: float | None = None) -> APIConnectionError:
    """The error for a failed exchange with the node at `url`, naming the cause. Library
    messages are not passed on: the cause is said in fixed words."""
    shown = _public_url(url)
    if isinstance(exc, asyncio.TimeoutError):
        limit = f" within {timeout:g} s" if timeout else ""
        return APITimeoutError(url=shown, cause=f"timed out: no answer{limit}")
    if isinstance(exc, aiohttp.InvalidURL):
        return APIConnectionError(url=shown, cause="not a valid URL")
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return APIConnectionError(url=shown, cause=f"DNS: the name {URL(url).host!r} does not resolve")
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return APIConnectionError(url=shown, cause="TLS: the node's certificate does not verify")
    if isinstance(exc, (aiohttp.ClientConnectorSSLError, aiohttp.ClientSSLError)):
        return APIConnectionError(url=shown, cause="TLS: the handshake failed (is the node serving plain http://?)")
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return APIConnectionError(url=shown, cause="connection refused: is the node running and listening there?")
        return APIConnectionError(url=shown, cause=f"cannot connect ({type(exc.os_error).__name__})")
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return APIConnectionError(url=shown, cause="the node closed the connection")
    if isinstance(exc, ssl.SSLError):  # raw sockets (reading the node's certificate), not aiohttp's
        return APIConnectionError(url=shown, cause="TLS: the handshake failed (is the node serving plain http://?)")
    if isinstance(exc, ConnectionRefusedError):
        return APIConnectionError(url=shown, cause="connection refused: is the node running and listening there?")
    return APIConnectionError(url=shown, cause=f"the connection failed ({type(exc).__name__})")


class _Pinned:
    """Keys (and, over HTTPS, the TLS certificate) pinned from one verified attestation document."""

    __slots__ = ("identity", "pin", "pinned_at")

    def __init__(self, identity: NodeIdentity) -> None:
        self.identity = identity
        self.pinned_at = time.monotonic()
        # Every connection after the attestation must present the attested certificate.
        certificate = identity.tls_cert_sha256
        self.pin: aiohttp.Fingerprint | None = aiohttp.Fingerprint(certificate) if certificate else None


def _certificate_mismatch(exc: aiohttp.ServerFingerprintMismatch) -> TlsCertificateMismatch:
    return TlsCertificateMismatch(
        f"the node presented TLS certificate sha256 {exc.got.hex()}, not the attested {exc.expected.hex()}: "
        "a man-in-the-middle, or a node that restarted and must be attested again"
    )


def _check_receipt(receipt: dict[str, Any], identity: NodeIdentity, model: str, clear_usages: list[Any]) -> Receipt:
    """Checks beyond `verify_receipt`: this key epoch, this model, clear usage = signed usage."""
    if receipt.get("key_epoch") != identity.key_epoch:
        raise ReceiptInvalid("receipt is for another key epoch")
    if receipt.get("model") != model:
        raise ReceiptInvalid("receipt is for another model")
    for usage in clear_usages:
        if usage is not None and usage != receipt.get("usage"):
            raise UsageMismatch()
    try:
        return Receipt.model_validate(receipt)
    except ValidationError:
        raise ReceiptInvalid("receipt is malformed") from None


def _parse(plaintext: bytes, kind: type[T]) -> T:
    try:
        data = json.loads(plaintext)
    except (ValueError, UnicodeDecodeError):
        raise UnexpectedResponse("decrypted response is not JSON") from None
    if not isinstance(data, dict):
        raise UnexpectedResponse("decrypted response is not a JSON object")
    data.pop("receipt", None)
    data.pop("attestation", None)
    data.pop(OBFUSCATION_FIELD, None)
    try:
        return kind.model_validate(data)
    except ValidationError:
        raise UnexpectedResponse("decrypted response does not have the expected shape") from None


class AsyncStream(Generic[T]):
    """A verified stream of chunks: `async for chunk in stream`.

    Each chunk is yielded as soon as its event decrypts and its signature verifies under the
    attested key. The event carrying the receipt (the last one, with usage and no choices) is
    held until the connection closes, so the iteration ends normally only when the receipt
    verified and nothing followed it; otherwise it raises (MissingReceipt, TranscriptMismatch,
    EventAfterEnd, a NodeAPIError for an error event...). Chunks yielded before an error were
    individually authentic but the answer as a whole was not confirmed: discard it.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        opener: ResponseOpener,
        identity: NodeIdentity,
        model: str,
        kind: type[T],
    ) -> None:
        self._response = response
        self._opener = opener
        self._kind = kind
        self._model = model
        self.attestation = identity
        self.receipt: Receipt | None = None
        self.usage: Any = None
        self.request_id = response.headers.get("X-Request-Id")
        self._iterating = False
        self._done = False

    def __aiter__(self) -> AsyncIterator[T]:
        if self._iterating:
            raise RuntimeError("a stream can be iterated once")
        self._iterating = True
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[T]:
        decoder = SSEDecoder()
        seen_nonces: set[str] = set()
        clear_usages: list[Any] = []
        held: T | None = None
        try:
            async for data in self._response.content.iter_any():
                try:
                    events = decoder.feed(data)
                except EventTooLarge:
                    raise UnexpectedResponse("stream event too large") from None
                for event_data in events:
                    chunk = self._open(event_data, seen_nonces, clear_usages)
                    if chunk is None:
                        continue
                    if self._opener.ended:
                        held = chunk  # the receipt's event: released once nothing follows it
                    elif not self._is_filler(chunk):
                        yield chunk
            if decoder.pending and self._opener.ended:
                raise ReceiptInvalid("data after the final event")
            raw_receipt = self._opener.finish()  # MissingReceipt when the stream was cut
            self.receipt = _check_receipt(raw_receipt, self.attestation, self._model, clear_usages)
            if held is not None:
                self.usage = getattr(held, "usage", None)
                self._done = True
                yield held
            self._done = True
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(str(self._response.url.origin()), exc) from None
        finally:
            self._response.release()

    def _open(self, data: bytes, seen_nonces: set[str], clear_usages: list[Any]) -> T | None:
        if data.strip() == SSE_DONE:
            return None
        try:
            event = json.loads(data)
        except ValueError:  # UnicodeDecodeError included
            raise MalformedEvent() from None
        if not isinstance(event, dict):
            raise MalformedEvent()
        if "error" in event and "ciphertext" not in event:
            raise error_from_body(None, event, request_id=self.request_id)
        if self._opener.ended:
            raise EventAfterEnd()
        nonce = event.get("nonce")
        if isinstance(nonce, str):
            # The node draws a fresh nonce per event: a repeat is a duplicated (replayed) event.
            if nonce in seen_nonces:
                raise DuplicateEvent()
            seen_nonces.add(nonce)
        plaintext = self._opener.open_event(event)
        if "usage" in event:
            clear_usages.append(event["usage"])
        return _parse(plaintext, self._kind)

    @staticmethod
    def _is_filler(chunk: BaseModel) -> bool:
        """A verified chunk with neither choices nor usage: a timing-cover event
        (`limits.stream_cadence_ms`) that only keeps the node's cadence."""
        return not getattr(chunk, "choices", None) and getattr(chunk, "usage", None) is None

    @property
    def completed(self) -> bool:
        """True once the stream ended with a verified receipt."""
        return self._done

    async def aclose(self) -> None:
        self._response.release()

    async def __aenter__(self) -> AsyncStream[T]:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()


class _ChatCompletions:
    def __init__(self, client: ConfidentialClient) -> None:
        self._client = client

    async def create(
        self, *, model: str, messages: list[dict[str, Any]], stream: bool = False, **params: Any
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        payload = {"model": model, "messages": messages, **params, "stream": bool(stream)}
        kind = ChatCompletionChunk if stream else ChatCompletion
        return await self._client._request("/v1/confidential/chat/completions", payload, stream, kind)


class _Chat:
    def __init__(self, client: ConfidentialClient) -> None:
        self.completions = _ChatCompletions(client)


class _Completions:
    def __init__(self, client: ConfidentialClient) -> None:
        self._client = client

    async def create(
        self, *, model: str, prompt: Any, stream: bool = False, **params: Any
    ) -> Completion | AsyncStream[Completion]:
        payload = {"model": model, "prompt": prompt, **params, "stream": bool(stream)}
        return await self._client._request("/v1/confidential/completions", payload, stream, Completion)


class _Embeddings:
    def __init__(self, client: ConfidentialClient) -> None:
        self._client = client

    async def create(self, *, model: str, input: Any, **params: Any) -> CreateEmbeddingResponse:
        payload = {"model": model, "input": input, **params}
        return await self._client._request("/v1/confidential/embeddings", payload, False, CreateEmbeddingResponse)


class _Models:
    def __init__(self, client: ConfidentialClient) -> None:
        self._client = client

    async def list(self) -> ModelList:
        """GET /v1/models (public metadata, not encrypted)."""
        return ModelList.model_validate(await self._client._get_json("/v1/models"))


class ConfidentialClient:
    """An async client that trusts a node only after verifying its TEE attestation.

        async with ConfidentialClient("http://127.0.0.1:8080", allow_simulated=True) as client:
            resp = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
            print(resp.choices[0].message.content, resp.receipt.key_epoch)

    Before the first request (and after the node reports STALE_NODE_KEY) the client fetches
    `/v1/attestation` with a fresh 32-byte nonce, verifies it against the policy
    (`attestation.document.verify_document`: authentic evidence, then `appraise`) and pins the node's X25519 key and Ed25519
    signing key from it. Every request is sealed to the pinned X25519 key; every response,
    event and receipt must be signed by the pinned signing key.

    Policy: `policy=attestation.appraisal.Policy(...)` or the path of a TOML policy file
    (docs/policy.md), or the shortcuts `allow_simulated`, `expected_measurements` (hex MRTD /
    MEASUREMENT values), `allowed_tee` ("tdx", "sev-snp"; simulated needs `allow_simulated`),
    `require_gpu`. The default policy refuses every node (default-deny, docs/policy.md).

    Attested TLS: with an `https://` URL the attestation is fetched without CA validation and
    without the API key; the document must bind the certificate that connection presented
    (`tls_cert_sha256`), and every later connection must present that same certificate
    (pinned by its SHA-256), else `TlsCertificateMismatch` (an AttestationError). A node that
    presents another certificate is attested again once (a restarted node has a new one). Retries: 429 OVERLOADED and
    503 NOT_READY up to `max_retries` times, waiting Retry-After (at most `max_retry_wait`
    seconds each); 422 STALE_NODE_KEY re-attests and retries once with a fresh envelope (the
    key in the 422 body is never used: only attested keys are). `reattest_after` (seconds)
    also re-attests a pin older than that before the next request.

    PROTOCOL.md part C, both on by default: `post_quantum` seals every request with the hybrid
    ML-KEM-768 + X25519 key agreement when the attested document offers an ML-KEM key
    (`key_exchange` says which was used); `length_hiding` pads every request and requires the
    node's answers and events to be padded (PaddingMissing otherwise); off, it asks the node
    not to pad (`stream_options.include_obfuscation: false`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        policy: Any = None,
        allow_simulated: bool = False,
        expected_measurements: Any = None,
        allowed_tee: Any = None,
        require_gpu: bool = False,
        timeout: float = 600.0,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        reattest_after: float | None = None,
        post_quantum: bool = True,
        length_hiding: bool = True,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        scheme = _scheme_of(base_url)
        self.tls = scheme == "https"
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.policy = make_policy(
            policy,
            allow_simulated=allow_simulated,
            expected_measurements=expected_measurements,
            allowed_tee=allowed_tee,
            require_gpu=require_gpu,
        )
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.reattest_after = reattest_after
        self.post_quantum = post_quantum
        self.length_hiding = length_hiding
        self._session = session
        self._owns_session = session is None
        self._pinned: _Pinned | None = None
        self._attest_lock: asyncio.Lock | None = None
        self.attestations = 0  # how many documents were fetched and verified
        # The waiting function for retries; tests replace it to observe delays without waiting.
        self._sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
        self.chat = _Chat(self)
        self.completions = _Completions(self)
        self.embeddings = _Embeddings(self)
        self.models = _Models(self)

    def __repr__(self) -> str:
        epoch = self._pinned.identity.key_epoch if self._pinned else None
        return f"ConfidentialClient({self.base_url!r}, key_epoch={epoch})"

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> ConfidentialClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers={"User-Agent": USER_AGENT})
            self._owns_session = True
        return self._session

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    # --- attestation ------------------------------------------------------------------

    @property
    def attestation(self) -> NodeIdentity | None:
        """The identity verified by the last attestation (None before the first)."""
        return self._pinned.identity if self._pinned else None

    @property
    def key_exchange(self) -> str | None:
        """The key agreement requests to the attested node use (None before the first attestation)."""
        if self._pinned is None:
            return None
        if self._hybrid_key(self._pinned.identity) is not None:
            return "hybrid ML-KEM-768 + X25519"
        return "X25519 (the attested node offers no ML-KEM key)" if self.post_quantum else "X25519 (post_quantum off)"

    def _hybrid_key(self, identity: NodeIdentity) -> bytes | None:
        """The attested ML-KEM key when requests are to use it (never a key from a lock or 422 body)."""
        return identity.kem_public_key if self.post_quantum else None

    async def attest(self) -> NodeIdentity:
        """Fetch and verify a fresh attestation now, and pin its keys."""
        if self._attest_lock is None:
            self._attest_lock = asyncio.Lock()
        async with self._attest_lock:
            self._pinned = None
            self._pinned = _Pinned(await self._fetch_attestation())
            return self._pinned.identity

    def _expired(self, pinned: _Pinned | None) -> bool:
        if pinned is None:
            return True
        return self.reattest_after is not None and time.monotonic() - pinned.pinned_at >= self.reattest_after

    async def _ensure_attested(self) -> _Pinned:
        if self._expired(self._pinned):
            if self._attest_lock is None:
                self._attest_lock = asyncio.Lock()
            async with self._attest_lock:
                if self._expired(self._pinned):
                    self._pinned = None  # never keep using keys whose evidence was refused
                    self._pinned = _Pinned(await self._fetch_attestation())
        assert self._pinned is not None
        return self._pinned

    async def _reattest(self, stale: _Pinned) -> _Pinned:
        """Re-attest unless another task already replaced the stale pin."""
        assert self._attest_lock is not None
        async with self._attest_lock:
            if self._pinned is stale:
                self._pinned = None
                self._pinned = _Pinned(await self._fetch_attestation())
        assert self._pinned is not None
        return self._pinned

    async def _fetch_attestation(self) -> NodeIdentity:
        from attestation.document import verify_document
        from attestation.errors import ParseError

        attempt = 0
        while True:
            nonce = os.urandom(ATTESTATION_NONCE_SIZE)  # fresh for every fetch, retries included
            # Over HTTPS: the certificate the node presents, taken without CA validation; the
            # document is fetched on a connection presenting that same certificate, without the
            # API key, and must bind it.
            certificate = await self._server_certificate() if self.tls else None
            pin = aiohttp.Fingerprint(hashlib.sha256(certificate).digest()) if certificate else None
            status, headers, body = await self._send(
                "GET", f"/v1/attestation?nonce={nonce.hex()}", None, pin=pin, authorize=not self.tls
            )
            if status == 200:
                break
            error = self._error(status, headers, body)
            if isinstance(error, (OverloadedError, NotReadyError)) and attempt < self.max_retries:
                attempt += 1
                await self._sleep(self._retry_delay(error, attempt))
                continue
            raise error
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise ParseError("attestation document is not JSON") from None
        if not isinstance(document, dict):
            raise ParseError("attestation document is not a JSON object")
        certificate_sha256 = hashlib.sha256(certificate).digest() if certificate is not None else None
        verified = verify_document(document, expected_nonce=nonce, policy=self.policy, tls_cert_sha256=certificate_sha256)
        if len(verified.dh_public_key) != 32 or len(verified.signing_public_key) != 32:
            raise ParseError("attested keys have the wrong length")
        config_digest = verified.config_digest
        for warning in verified.warnings:  # e.g. accept_any_measurement: said on every attestation
            log.warning("attestation accepted with a warning: %s", warning)
        self.attestations += 1
        return NodeIdentity(
            tee=verified.tee,
            simulated=bool(verified.simulated),
            measurement=verified.measurement,
            key_epoch=verified.key_epoch,
            config_digest=config_digest.hex(),
            dh_public_key=bytes(verified.dh_public_key),
            signing_public_key=bytes(verified.signing_public_key),
            verified_at=datetime.now(timezone.utc),
            kem_public_key=verified.kem_public_key,
            tcb_status=verified.tcb_status,
            gpu_devices=verified.gpu_devices,
            notes=(*verified.notes, *verified.warnings),
            claims=verified.claims.as_json(),
            tls_cert_sha256=certificate_sha256,
            tls_certificate=certificate,
            document=document,
        )

    # --- HTTP ---------------------------------------------------------------------------

    async def _server_certificate(self) -> bytes:
        """The DER certificate the node presents, read from a TLS handshake without CA validation
        (what makes it trusted is the attestation that must bind it)."""
        url = urlsplit(self.base_url)
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(url.hostname, url.port or 443, ssl=unverified), self.timeout
            )
        except (asyncio.TimeoutError, OSError) as exc:  # ssl.SSLError is an OSError
            raise unreachable(self.base_url, exc, self.timeout) from None
        try:
            certificate = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            writer.close()
            with contextlib.suppress(OSError, ssl.SSLError):
                await writer.wait_closed()
        if not certificate:
            raise APIConnectionError("the node presented no TLS certificate")
        return certificate

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, *, pin: aiohttp.Fingerprint | None, authorize: bool = True
    ) -> tuple[int, Any, bytes]:
        """A whole (non-streaming) exchange: status, headers, body; over HTTPS only with a
        connection presenting the `pin`ned certificate."""
        headers = self._headers() if authorize else {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            async with self._http().request(
                method,
                self.base_url + path,
                data=_compact(body) if body is not None else None,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                ssl=pin or True,
            ) as response:
                if response.content_length is not None and response.content_length > MAX_RESPONSE_BYTES:
                    raise UnexpectedResponse("response too large")
                data = await response.content.read(MAX_RESPONSE_BYTES + 1)
                if len(data) > MAX_RESPONSE_BYTES:
                    raise UnexpectedResponse("response too large")
                return response.status, response.headers, data
        except aiohttp.ServerFingerprintMismatch as exc:
            raise _certificate_mismatch(exc) from None
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(self.base_url, exc, self.timeout) from None

    async def _get_json(self, path: str) -> Any:
        """GET `path`; over HTTPS only on a connection to the attested certificate."""
        repinned = False
        while True:
            pinned = await self._ensure_attested() if self.tls else None
            try:
                status, headers, body = await self._send("GET", path, None, pin=pinned.pin if pinned else None)
                break
            except TlsCertificateMismatch:
                if repinned or pinned is None:
                    raise
                repinned = True
                await self._reattest(pinned)
        if status != 200:
            raise self._error(status, headers, body)
        try:
            return json.loads(body)
        except ValueError:
            raise UnexpectedResponse("response is not JSON") from None

    @staticmethod
    def _error(status: int, headers: Any, body: bytes) -> NodeAPIError:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            parsed = None
        return error_from_body(
            status,
            parsed,
            request_id=headers.get("X-Request-Id"),
            retry_after=_retry_after(headers.get("Retry-After")),
        )

    def _retry_delay(self, error: NodeAPIError, attempt: int) -> float:
        retry_after = getattr(error, "retry_after", None)
        delay = retry_after if retry_after is not None else 0.5 * 2 ** (attempt - 1)
        return min(delay, self.max_retry_wait)

    async def _request(self, path: str, payload: dict[str, Any], stream: bool, kind: type[T]) -> Any:
        """Seal, send, retry as the node asks, then open and verify the answer."""
        model = payload["model"]
        if not isinstance(model, str):
            raise TypeError("model must be a string")
        payload = {k: v for k, v in payload.items() if k != OBFUSCATION_FIELD}  # the padding is ours to add
        if not self.length_hiding:
            options = payload.get("stream_options")
            payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_obfuscation": False}
        plaintext = _compact(payload)
        reattested = repinned = False
        attempt = 0
        while True:
            pinned = await self._ensure_attested()
            identity = pinned.identity
            outer, opener = seal_request(
                plaintext,
                identity.dh_public_key,
                model,
                kem_public_key=self._hybrid_key(identity),
                padding=self.length_hiding,
                stream=stream or None,
                signing_key=identity.signing_public_key,
            )
            try:
                response = await self._post(path, outer, stream, pinned.pin)
            except TlsCertificateMismatch:
                if repinned:
                    raise
                repinned = True  # a restarted node has a new certificate: attest it once more
                await self._reattest(pinned)
                continue
            if response.status == 200:
                break
            try:
                body = await response.content.read(1024 * 1024)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                body = b""
            finally:
                response.release()
            error = self._error(response.status, response.headers, body)
            if isinstance(error, StaleNodeKeyError) and not reattested:
                reattested = True
                await self._reattest(pinned)
                continue
            if isinstance(error, (OverloadedError, NotReadyError)) and attempt < self.max_retries:
                attempt += 1
                await self._sleep(self._retry_delay(error, attempt))
                continue
            raise error
        if stream:
            content_type = response.headers.get("Content-Type", "")
            if not content_type.startswith("text/event-stream"):
                response.release()
                raise UnexpectedResponse("expected an event stream")
            return AsyncStream(response, opener, identity, model, kind)
        try:
            data = await response.content.read(MAX_RESPONSE_BYTES + 1)
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(self.base_url, exc, self.timeout) from None
        finally:
            response.release()
        if len(data) > MAX_RESPONSE_BYTES:
            raise UnexpectedResponse("response too large")
        try:
            sealed = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise UnexpectedResponse("response is not JSON") from None
        if not isinstance(sealed, dict):
            raise UnexpectedResponse("response is not a JSON object")
        opened = opener.open_response(sealed, require_receipt=True)
        receipt = _check_receipt(opener.finish(), identity, model, [sealed.get("usage")])
        result = _parse(opened, kind)
        result.receipt = receipt  # type: ignore[attr-defined]
        result.attestation = identity  # type: ignore[attr-defined]
        return result

    async def _post(
        self, path: str, outer: dict[str, Any], stream: bool, pin: aiohttp.Fingerprint | None
    ) -> aiohttp.ClientResponse:
        timeout = (
            aiohttp.ClientTimeout(total=None, sock_connect=self.timeout, sock_read=self.timeout)
            if stream
            else aiohttp.ClientTimeout(total=self.timeout)
        )
        headers = {**self._headers(), "Content-Type": "application/json"}
        if stream:
            headers["Accept"] = "text/event-stream"
        try:
            return await self._http().post(
                self.base_url + path, data=_compact(outer), headers=headers, timeout=timeout, ssl=pin or True
            )
        except aiohttp.ServerFingerprintMismatch as exc:
            raise _certificate_mismatch(exc) from None
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise unreachable(self.base_url, exc, self.timeout) from None


__all__ = ["AsyncStream", "ConfidentialClient", "make_policy"]
