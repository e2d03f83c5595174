"""The node as Privacy Pass issuer and origin at once (RFC 9576's joint deployment): token keys
(made at start or loaded from the state directory, rotated with an overlap), issuance to
accounts under an hourly quota, and redemption that spends each token once, across restarts.

A redeemed token says only that some account was issued it: nothing derived from a token
reaches a log line, a metric label or a rate-limit key; the spent-nonce sets (one file per live
key, removed when the key retires) are the only record of redemptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from .. import privacypass as pp
from ..config import NodeConfig
from ..crypto import b64url_e, constant_time_equal
from ..errors import (
    InvalidToken,
    InvalidTokenRequest,
    TokenBatchTooLarge,
    TokenKeyRetired,
    TokenQuotaExceeded,
    TokenSpent,
)
from ..private_files import PrivateFileError, open_private, read_private, sync_directory, write_private
from .admission import TokenBucket

log = logging.getLogger("tee_node.privacy_pass")

KEYS_FILE = "privacy-pass-keys.json"
SPENT_PREFIX = "privacy-pass-spent-"
ISSUANCE_PATH = "/v1/privacy-pass/token-request"
DIRECTORY_PATH = "/v1/privacy-pass/token-keys"


class SpentNonces:
    """The nonces of one key's redeemed tokens: a set, and a file of 32-byte records appended
    before a redemption is answered (a record cut short by a crash is ignored on load)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._nonces: set[bytes] = set()
        try:
            data = read_private(path, "spent-token file")
        except FileNotFoundError:
            data = b""
        whole = len(data) - len(data) % pp.NONCE_SIZE
        self._nonces.update(data[i : i + pp.NONCE_SIZE] for i in range(0, whole, pp.NONCE_SIZE))
        self._fd = open_private(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, "spent-token file")
        if whole != len(data):
            os.ftruncate(self._fd, whole)

    def claim(self, nonce: bytes) -> bool:
        """Mark `nonce` spent (False when it already was) and append it to the file; `sync`
        makes it survive a power cut."""
        if nonce in self._nonces:
            return False
        self._nonces.add(nonce)
        os.write(self._fd, nonce)  # one O_APPEND write: whole or not at all for a process crash
        return True

    def sync(self) -> None:
        """The claimed nonces reach the disk (a power cut too leaves them spent)."""
        os.fdatasync(self._fd)

    def close(self, remove: bool = False) -> None:
        os.close(self._fd)
        if remove:
            self.path.unlink(missing_ok=True)


class TokenKeys:
    """The live token keys, newest (the one that issues) first, kept in the state directory."""

    def __init__(self, state_dir: Path, rotation_interval: float, overlap: float) -> None:
        self.state_dir = state_dir
        self.rotation_interval = rotation_interval
        self.overlap = overlap
        self.keys: list[pp.IssuerKey] = []
        self.spent: dict[bytes, SpentNonces] = {}

    @property
    def path(self) -> Path:
        return self.state_dir / KEYS_FILE

    @property
    def current(self) -> pp.IssuerKey:
        return self.keys[0]

    def load(self, now: float) -> None:
        try:
            data = read_private(self.path, "token key file")
        except FileNotFoundError:
            data = None
        if data is not None:
            try:
                stored = json.loads(data)
                self.keys = [pp.IssuerKey(bytes.fromhex(k["seed"]), float(k["created_at"])) for k in stored["keys"]]
            except (ValueError, KeyError, TypeError):
                raise PrivateFileError(
                    f"token key file {self.path} is damaged: delete it (the node makes a new token key; "
                    "tokens issued under the old one are then refused)"
                ) from None
            self.keys.sort(key=lambda k: k.created_at, reverse=True)
        self.maintain(now)
        for key in self.keys:
            self._open_spent(key)

    def maintain(self, now: float) -> None:
        """Rotate when due and retire keys past their overlap (saved when anything changed)."""
        changed = False
        if not self.keys or now - self.current.created_at >= self.rotation_interval:
            self.keys.insert(0, self._new_key(now))
            changed = True
        # A key redeems until `overlap` after its successor took over.
        live = [self.keys[0]]
        for older, newer in zip(self.keys[1:], self.keys):
            if now - newer.created_at >= self.overlap:
                break
            live.append(older)
        for retired in self.keys[len(live):]:
            spent = self.spent.pop(retired.key_id, None)
            if spent is not None:
                spent.close(remove=True)
            else:
                (self.state_dir / self._spent_name(retired)).unlink(missing_ok=True)
            changed = True
        self.keys = live
        if changed:
            self._save()
            for key in self.keys:
                self._open_spent(key)
            log.info("privacy pass: %d token key(s) live, rotated every %.0f s", len(self.keys), self.rotation_interval)

    def _new_key(self, now: float) -> pp.IssuerKey:
        # RFC 9578: truncated key ids of keys in rotation should not collide.
        taken = {key.truncated_key_id for key in self.keys}
        while True:
            key = pp.IssuerKey.generate(now)
            if key.truncated_key_id not in taken:
                return key

    def _save(self) -> None:
        stored = {"version": 1, "keys": [{"seed": k.seed.hex(), "created_at": k.created_at} for k in self.keys]}
        write_private(self.path, json.dumps(stored).encode())

    @staticmethod
    def _spent_name(key: pp.IssuerKey) -> str:
        return SPENT_PREFIX + key.key_id.hex() + ".bin"

    def _open_spent(self, key: pp.IssuerKey) -> None:
        if key.key_id not in self.spent:
            self.spent[key.key_id] = SpentNonces(self.state_dir / self._spent_name(key))
            sync_directory(self.state_dir)

    def by_id(self, key_id: bytes) -> pp.IssuerKey | None:
        for key in self.keys:  # public ids, a few keys: no need to hide which one matched
            if key.key_id == key_id:
                return key
        return None

    def close(self) -> None:
        for spent in self.spent.values():
            spent.close()
        self.spent.clear()


class PrivacyPass:
    """Issuer and redeemer of one node (`auth.privacy_pass.enabled`)."""

    def __init__(self, config: NodeConfig, now: Callable[[], float] = time.time) -> None:
        settings = config.auth.privacy_pass
        self.settings = settings
        self.now = now
        self.challenge = pp.TokenChallenge(settings.issuer_name)
        self._challenge_digest = self.challenge.digest
        self.keys = TokenKeys(config.attestation.state_dir, settings.key_rotation_interval, settings.key_overlap)
        self.keys.load(now())
        self._quotas: dict[bytes, TokenBucket] = {}  # by account: the digest of its bearer token

    def token_key(self) -> bytes:
        """The TokenKey that issues now (what the attestation document binds)."""
        return self.keys.current.public_key

    def www_authenticate(self) -> str:
        return pp.www_authenticate(self.challenge, self.token_key())

    def directory(self) -> dict:
        """The issuer directory (RFC 9578 section 4): the issuing key first, then keys that still
        redeem."""
        return {
            "issuer-request-uri": ISSUANCE_PATH,
            "token-keys": [{"token-type": pp.TOKEN_TYPE, "token-key": b64url_e(key.public_key)} for key in self.keys.keys],
        }

    def issue(self, account: bytes, body: bytes) -> tuple[bytes, int]:
        """The TokenResponse for `account`'s TokenRequest, within its hourly quota, and the
        number of tokens it issues."""
        request = pp.TokenRequest.from_bytes(body, self.settings.max_batch)
        key = self.keys.current
        if request.truncated_key_id != key.truncated_key_id:
            raise InvalidTokenRequest()
        count = len(request.blinded)
        if count > self.settings.tokens_per_hour:
            raise TokenBatchTooLarge()
        quota = self._take(account, count)
        try:
            response = key.issue(request)
        except InvalidTokenRequest:
            quota.tokens += count  # nothing issued: nothing charged
            raise
        return response, count

    def _take(self, account: bytes, count: int) -> TokenBucket:
        now = time.monotonic()
        bucket = self._quotas.get(account)
        if bucket is None:
            bucket = self._quotas[account] = TokenBucket(self.settings.tokens_per_hour, now, period=3600.0)
        bucket.refill(now)
        wait = bucket.wait(count)
        if wait:
            raise TokenQuotaExceeded(wait)
        bucket.tokens -= count
        return bucket

    async def redeem(self, token_bytes: bytes) -> None:
        """Accept the token once: authentic, for this node's challenge, of a live key, unspent."""
        token = pp.Token.from_bytes(token_bytes)
        key = self.keys.by_id(token.token_key_id)
        if key is None:
            raise TokenKeyRetired()
        challenge_ok = constant_time_equal(token.challenge_digest, self._challenge_digest)
        if not key.authentic(token) or not challenge_ok:
            raise InvalidToken()
        spent = self.keys.spent[key.key_id]
        if not spent.claim(token.nonce):
            raise TokenSpent()
        # The answer waits until the spend is on disk; the loop serves others meanwhile.
        await asyncio.to_thread(spent.sync)

    def maintain(self) -> None:
        self.keys.maintain(self.now())

    def close(self) -> None:
        self.keys.close()


def authorization_token(request: web.BaseRequest) -> bytes | None:
    """The token of an `Authorization: PrivateToken` header (None for other schemes)."""
    return pp.token_from_authorization(request.headers.get("Authorization", ""))


async def privacy_pass_lifecycle(app: web.Application, issuer: PrivacyPass) -> AsyncIterator[None]:
    """Rotate and retire token keys on schedule; close the spent-token files at the end."""
    period = max(0.05, min(60.0, issuer.settings.key_rotation_interval / 10, (issuer.settings.key_overlap or 60.0) / 10))

    async def loop() -> None:
        while True:
            await asyncio.sleep(period)
            issuer.maintain()

    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    issuer.close()

