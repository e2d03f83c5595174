"""`ConfidentialClient`: attest the node, pin its keys, seal every request, verify every answer.

The client is put together from its concerns, each a module of its own: `transports` (how
bytes reach the node), `credentials` (what authorises a request), `session` (attestation,
pinned keys, re-attestation) and `calls` (the namespaces, sealing, opening, streams, receipts).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import aiohttp

from .calls import Calls, Chat, Completions, Embeddings, Images, Models
from .credentials import Bearer, Credential
from .credentials.privacy_pass import PrivateTokens, Wallet, fetch_tokens
from .errors import NotReadyError, OverloadedError, TeeNodeError
from .session import AttestedSession, make_policy
from .streams import AsyncStream
from .transports import DirectRoute, HttpSession, OhttpRelayRoute, PinnedTlsRoute, Route, scheme_of
from .types import NodeIdentity


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
    (docs/policy.md), and on top of it (or of the default policy) the shortcuts
    `allow_simulated`, `expected_measurements` (hex MRTD / MEASUREMENT values), `pins`
    (`{"rtmr1": HEX, ...}` by the policy file's register names), `allowed_tee` ("tdx",
    "sev-snp"; simulated needs `allow_simulated`), `require_gpu`, `allow_classical` (accept a
    node without an ML-KEM key). The default policy refuses every node (default-deny,
    docs/policy.md).

    Credential: `api_key` (sent as `Authorization: Bearer`), `tokens=Wallet(path)` (one
    Privacy Pass token per request, `Authorization: PrivateToken`, never the API key; see
    `fetch_tokens`), or `credential=` any `node.client.credentials.Credential`. No
    credential goes with anything sent before the node's attestation was verified and accepted
    (the attestation itself included): the first request of any kind, `models.list()` too,
    attests first. The client follows no redirects
    (`RedirectRefused`). Over plain `http://` a document that binds a TLS certificate is
    refused (the node serves attested TLS: use `https://`), except on loopback.

    Collateral: `collateral=DIR` verifies the node's evidence with the Intel/AMD collateral in
    DIR (the node's `attestation.collateral_dir` layout) instead of what the document bundles
    (`Policy.with_collateral`; CollateralInvalid when DIR holds none).

    Attested TLS: with an `https://` URL the attestation is fetched without CA validation and
    without the API key; the document must bind the certificate that connection presented
    (`tls_cert_sha256`), and every later connection must present that same certificate
    (pinned by its SHA-256), else `TlsCertificateMismatch` (an AttestationError). A node that
    presents another certificate is attested again once (a restarted node has a new one).

    Relay: with `relay="https://relay.example"` nothing goes to `base_url` directly: the key
    configuration, the attestation and every request travel as Oblivious HTTP through that
    relay (docs/ohttp.md), the node seeing none of the client's addresses. The gateway key the
    attestation request went to must be one the verified document binds (`public_keys.ohttp`,
    else `OhttpKeyMismatch`); later requests use the attested key configuration. Everything
    inside (envelope, receipts, padding, post-quantum key agreement, policy) is unchanged. Retries: 429 OVERLOADED and
    503 NOT_READY up to `max_retries` times, waiting Retry-After (at most `max_retry_wait`
    seconds each); 422 STALE_NODE_KEY re-attests and retries once with a fresh envelope (the
    key in the 422 body is never used: only attested keys are). `reattest_after` (seconds)
    also re-attests a pin older than that before the next request.

    Both on by default: `post_quantum` seals every request with the hybrid ML-KEM-768 +
    X25519 key agreement when the attested document offers an ML-KEM key (`key_exchange` says
    which was used); `length_hiding` pads every request and requires the node's answers and
    events to be padded (PaddingMissing otherwise); off, it asks the node not to pad
    (`stream_options.include_obfuscation: false`).
    """

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        credential: Credential | None = None,
        tokens: Wallet | None = None,
        policy: Any = None,
        allow_simulated: bool = False,
        expected_measurements: Any = None,
        allowed_tee: Any = None,
        require_gpu: bool = False,
        pins: Mapping[str, Any] | None = None,
        allow_classical: bool = False,
        timeout: float = 600.0,
        max_retries: int = 2,
        max_retry_wait: float = 30.0,
        reattest_after: float | None = None,
        post_quantum: bool = True,
        length_hiding: bool = True,
        collateral: str | os.PathLike[str] | None = None,
        relay: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        if sum(1 for given in (api_key, credential, tokens) if given) > 1:
            raise ValueError("pass one of api_key=, tokens= or credential=")
        scheme = scheme_of(base_url)
        self.tls = scheme == "https"
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        # The waiting function for retries; tests replace it to observe delays without waiting.
        self._sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep
        http = HttpSession(session)
        self.relay = relay.rstrip("/") if relay else None
        route: Route
        if self.relay is not None:
            scheme_of(self.relay)
            route = OhttpRelayRoute(http, self.base_url, self.relay, timeout)
        else:
            route = (PinnedTlsRoute if self.tls else DirectRoute)(http, self.base_url, timeout)
        credential = Bearer(api_key) if api_key else PrivateTokens(tokens) if tokens is not None else credential
        self._session = AttestedSession(
            route,
            make_policy(
                policy,
                allow_simulated=allow_simulated,
                expected_measurements=expected_measurements,
                allowed_tee=allowed_tee,
                require_gpu=require_gpu,
                pins=pins,
                allow_classical=allow_classical,
                collateral=collateral,
            ),
            retry=self._retry,
            reattest_after=reattest_after,
            post_quantum=post_quantum,
        )
        self._calls = Calls(self._session, credential, self._retry, length_hiding=length_hiding)
        self.chat = Chat(self._calls)
        self.completions = Completions(self._calls)
        self.embeddings = Embeddings(self._calls)
        self.images = Images(self._calls)
        self.models = Models(self._calls)

    def __repr__(self) -> str:
        identity = self._session.identity
        return f"ConfidentialClient({self.base_url!r}, key_epoch={identity.key_epoch if identity else None})"

    # --- settings kept by the concern that uses them ---------------------------------------

    @property
    def policy(self) -> Any:
        return self._session.policy

    @policy.setter
    def policy(self, value: Any) -> None:
        self._session.policy = value

    @property
    def reattest_after(self) -> float | None:
        return self._session.reattest_after

    @reattest_after.setter
    def reattest_after(self, value: float | None) -> None:
        self._session.reattest_after = value

    @property
    def post_quantum(self) -> bool:
        return self._session.post_quantum

    @post_quantum.setter
    def post_quantum(self, value: bool) -> None:
        self._session.post_quantum = value

    @property
    def length_hiding(self) -> bool:
        return self._calls.length_hiding

    @length_hiding.setter
    def length_hiding(self, value: bool) -> None:
        self._calls.length_hiding = value

    @property
    def attestations(self) -> int:
        """How many documents were fetched and verified."""
        return self._session.attestations

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> ConfidentialClient:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._session.route.aclose()

    # --- attestation ------------------------------------------------------------------

    @property
    def attestation(self) -> NodeIdentity | None:
        """The identity verified by the last attestation (None before the first)."""
        return self._session.identity

    @property
    def key_exchange(self) -> str | None:
        """The key agreement requests to the attested node use (None before the first attestation)."""
        return self._session.key_exchange

    async def attest(self) -> NodeIdentity:
        """Fetch and verify a fresh attestation now, and pin its keys."""
        return (await self._session.attest()).identity

    async def fetch_tokens(self, api_key: str, count: int, wallet: Wallet) -> int:
        """Attest the node, then fetch `count` Privacy Pass tokens for the account of `api_key`
        into `wallet` (`credentials.privacy_pass.fetch_tokens`); how many were added."""
        return await fetch_tokens(self._session, api_key, count, wallet)

    # --- retries ------------------------------------------------------------------------

    async def _retry(self, error: TeeNodeError, attempt: int) -> bool:
        """429 OVERLOADED and 503 NOT_READY: wait as the node asks (Retry-After, else backing
        off), at most `max_retry_wait`, up to `max_retries` times."""
        if not isinstance(error, (OverloadedError, NotReadyError)) or attempt > self.max_retries:
            return False
        retry_after = getattr(error, "retry_after", None)
        delay = retry_after if retry_after is not None else 0.5 * 2 ** (attempt - 1)
        await self._sleep(min(delay, self.max_retry_wait))
        return True


__all__ = ["AsyncStream", "ConfidentialClient", "make_policy"]
