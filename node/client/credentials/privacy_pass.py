"""Privacy Pass tokens as a credential: a `Wallet` of unspent tokens (an owner-only file),
`PrivateTokens` spending one per request, and `fetch_tokens` filling the wallet from an
attested node with an account's API key (docs/privacy-pass.md).

A token says only that some account was issued it, so a request that carries one must carry
nothing else of the account: `PrivateTokens` never sends the API key, and the key used to fetch
tokens goes only to the issuance route, after the node's attestation was verified and its token
key found to be the attested one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ... import privacypass as pp
from ...crypto import Base64Error, b64d, b64url_d, b64url_e
from ...errors import TeeNodeError, TokenIssuanceInvalid
from ...private_files import PrivateFileError, open_private, read_private, write_private
from . import Outgoing

if TYPE_CHECKING:
    from ..session import AttestedSession
    from ..types import NodeIdentity

WALLET_VERSION = 1
# Tokens one token request asks for: the node refuses more than auth.privacy_pass.max_batch
# (default 100), and a smaller batch holds its event loop for less.
FETCH_BATCH = 32
DIRECTORY_PATH = "/v1/privacy-pass/token-keys"
ISSUANCE_PATH = "/v1/privacy-pass/token-request"


class NoTokensLeft(TeeNodeError):
    """The wallet has no unspent token: fetch more (`tee-node tokens fetch`)."""

    message = "the token wallet is empty: fetch more tokens with `tee-node tokens fetch`"


class Wallet:
    """Unspent tokens in a JSON file (mode 0600, rewritten atomically), usable from threads and
    processes at once: a token offered twice would tell the node that both requests came from
    one wallet, so every change holds a lock (an flock on `<wallet>.lock` and a thread lock)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        with self._thread_lock:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = open_private(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, "token wallet lock")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # releases the flock

    def __repr__(self) -> str:
        return f"Wallet({str(self.path)!r})"

    def _load(self) -> list[bytes]:
        try:
            raw = read_private(self.path, "token wallet")  # PrivateFileError: says what to do
        except FileNotFoundError:
            return []
        try:
            data = json.loads(raw)
            if data.get("version") != WALLET_VERSION:
                raise ValueError("version")
            return [b64url_d(token) for token in data["tokens"]]
        except (ValueError, KeyError, TypeError, AttributeError, Base64Error):
            raise PrivateFileError(f"token wallet {self.path} is damaged: move it away and fetch new tokens") from None

    def _save(self, tokens: list[bytes]) -> None:
        document = {"version": WALLET_VERSION, "tokens": [b64url_e(token) for token in tokens]}
        write_private(self.path, json.dumps(document, indent=1).encode())

    def __len__(self) -> int:
        with self._lock():
            return len(self._load())

    def add(self, tokens: list[bytes]) -> None:
        with self._lock():
            self._save(self._load() + tokens)

    def take(self, key_id: bytes | None = None) -> bytes:
        """One token, removed from the file before it is returned (a token is never offered
        twice); one of the key `key_id` when the wallet has one."""
        with self._lock():
            tokens = self._load()
            if not tokens:
                raise NoTokensLeft()
            index = next((i for i, t in enumerate(tokens) if key_id is not None and t[66:98] == key_id), 0)
            token = tokens.pop(index)
            self._save(tokens)
            return token


def attested_token_key(identity: NodeIdentity) -> bytes:
    """The token key the node's attestation binds (`public_keys.privacy_pass`)."""
    public_keys = (identity.document or {}).get("public_keys") or {}
    value = public_keys.get("privacy_pass")
    if not isinstance(value, str):
        raise TokenIssuanceInvalid("the attested node binds no Privacy Pass token key (auth.privacy_pass is off)")
    try:
        return b64d(value)
    except Base64Error:
        raise TokenIssuanceInvalid("the attested token key is not base64") from None


class PrivateTokens:
    """`Authorization: PrivateToken token="..."`: one token of the wallet per request sent,
    retries included (the calls ask only once the node's attestation was accepted)."""

    def __init__(self, wallet: Wallet) -> None:
        self.wallet = wallet

    def __repr__(self) -> str:
        return f"PrivateTokens({self.wallet!r})"

    async def headers(self, request: Outgoing) -> Mapping[str, str]:
        try:
            key_id = pp.token_key_id(attested_token_key(request.identity))
        except TokenIssuanceInvalid:
            key_id = None  # tokens of a key the node no longer attests may still be in their overlap
        return {"Authorization": pp.authorization(self.wallet.take(key_id))}


async def fetch_tokens(session: AttestedSession, api_key: str, count: int, wallet: Wallet) -> int:
    """Attest the node, check that its issuer directory and its challenge name the attested
    token key, then fetch `count` tokens with `api_key` in batches, verify each batch's proof
    against that key, and add the tokens to `wallet`. Returns how many were added."""
    from ..errors import error_from_response

    if count < 1:
        raise ValueError("count must be at least 1")
    pinned = await session.attest()  # a fresh attestation before the API key goes anywhere
    token_key = attested_token_key(pinned.identity)
    transport = pinned.transport
    directory = await transport.request("GET", DIRECTORY_PATH, {"Accept": pp.DIRECTORY_MEDIA_TYPE}, None)
    if directory.status != 200:
        raise error_from_response(directory, transport.url)
    try:
        keys = json.loads(directory.body)["token-keys"]
        listed = b64url_d(keys[0]["token-key"])
    except (ValueError, KeyError, IndexError, TypeError, Base64Error):
        raise TokenIssuanceInvalid("the node's issuer directory is malformed") from None
    if listed != token_key:
        raise TokenIssuanceInvalid("the node's issuer directory names another token key than its attestation")
    # The challenge comes in the 401 of a request without credentials (nothing is spent).
    probe = await transport.request("GET", "/v1/models", {"Accept": "application/json"}, None)
    parsed = pp.parse_www_authenticate(probe.headers.get("WWW-Authenticate", ""))
    if probe.status != 401 or parsed is None:
        raise TokenIssuanceInvalid("the node sent no Privacy Pass challenge")
    challenge, challenge_key = parsed
    if challenge_key != token_key:
        raise TokenIssuanceInvalid("the node's challenge names another token key than its attestation")
    added = 0
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Content-Type": pp.REQUEST_MEDIA_TYPE,
        "Accept": pp.RESPONSE_MEDIA_TYPE,
    }
    while added < count:
        batch = min(FETCH_BATCH, count - added)
        pending = pp.PendingIssuance(token_key, challenge, batch)
        response = await transport.request("POST", ISSUANCE_PATH, headers, pending.request.to_bytes())
        if response.status != 200:
            raise error_from_response(response, transport.url)
        tokens = pending.finalize(response.body)  # TokenIssuanceInvalid unless the proof verifies
        wallet.add(tokens)
        added += len(tokens)
    return added


__all__ = ["NoTokensLeft", "PrivateTokens", "Wallet", "attested_token_key", "fetch_tokens"]
