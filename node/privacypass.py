"""Privacy Pass, token type 0x0001 (VOPRF(P-384, SHA-384)): RFC 9578's issuance messages, this
node's batched form of them, RFC 9577's token, challenge and HTTP headers, both sides.

Pure functions and small objects over bytes, no I/O (like `node.envelope`): the node's issuer
and redeemer (`node.server.privacy_pass`), the client's wallet and the tests call this module.
The group arithmetic, proofs and hashing to the curve are the `voprf` package's (RFC 9497).

Layouts (docs/protocol.md, "Anonymous tokens"):
- TokenRequest (RFC 9578): type(2) | truncated_token_key_id(1) | blinded_msg(Ne=49), 52 bytes;
- batched TokenRequest: type(2) | truncated_token_key_id(1) | length(2) | n * blinded_msg(49);
- TokenResponse (RFC 9578): evaluate_msg(49) | evaluate_proof(96);
- batched TokenResponse: length(2) | n * evaluate_msg(49) | one batch proof(96);
- Token (RFC 9577): type(2) | nonce(32) | challenge_digest(32) | token_key_id(32) | authenticator(48).
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass

from voprf import p384

from .crypto import Base64Error, b64url_d, b64url_e, constant_time_equal, random_bytes
from .errors import InvalidToken, InvalidTokenRequest, TokenBatchTooLarge, TokenIssuanceInvalid

TOKEN_TYPE = 0x0001
ELEMENT_SIZE = 49  # Ne: a compressed P-384 point
PROOF_SIZE = 96  # Ns + Ns: two P-384 scalars
AUTHENTICATOR_SIZE = 48  # Nk = Nh: SHA-384
NONCE_SIZE = 32
TOKEN_SIZE = 2 + NONCE_SIZE + 32 + 32 + AUTHENTICATOR_SIZE
SINGLE_REQUEST_SIZE = 3 + ELEMENT_SIZE
# RFC 9578, "Issuer Configuration": DeriveKeyPair(seed, "PrivacyPass"). The voprf package takes
# a 32-byte seed (RFC 9578 suggests Ns = 48 bytes; 32 random bytes are the key's full strength).
KEY_INFO = b"PrivacyPass"
KEY_SEED_SIZE = 32

REQUEST_MEDIA_TYPE = "application/private-token-request"
RESPONSE_MEDIA_TYPE = "application/private-token-response"
DIRECTORY_MEDIA_TYPE = "application/private-token-issuer-directory"
SCHEME = "PrivateToken"


def token_key_id(token_key: bytes) -> bytes:
    """SHA-256 of the serialised issuer public key (RFC 9578 section 6.5)."""
    return hashlib.sha256(token_key).digest()


# --- the challenge (RFC 9577 section 2.1) ----------------------------------------------------


@dataclass(frozen=True)
class TokenChallenge:
    """struct { token_type; issuer_name<1..2^16-1>; redemption_context<0..32>; origin_info<0..2^16-1> }."""

    issuer_name: str
    redemption_context: bytes = b""
    origin_info: str = ""

    def to_bytes(self) -> bytes:
        issuer = self.issuer_name.encode()
        origin = self.origin_info.encode()
        return (
            struct.pack("!HH", TOKEN_TYPE, len(issuer)) + issuer
            + bytes([len(self.redemption_context)]) + self.redemption_context
            + struct.pack("!H", len(origin)) + origin
        )

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.to_bytes()).digest()


_CHALLENGE_PARAMS = re.compile(r'^PrivateToken\s+challenge="([A-Za-z0-9_=-]+)",\s*token-key="([A-Za-z0-9_=-]+)"', re.IGNORECASE)


def parse_www_authenticate(value: str) -> tuple[bytes, bytes] | None:
    """(TokenChallenge bytes, token key) of the node's `WWW-Authenticate` value, or None."""
    match = _CHALLENGE_PARAMS.match(value.strip())
    if match is None:
        return None
    try:
        return b64url_d(match.group(1)), b64url_d(match.group(2))
    except Base64Error:
        return None


def www_authenticate(challenge: TokenChallenge, token_key: bytes) -> str:
    """The WWW-Authenticate value a 401 carries (RFC 9577 section 2.1)."""
    return f'{SCHEME} challenge="{b64url_e(challenge.to_bytes())}", token-key="{b64url_e(token_key)}"'


def authorization(token: bytes) -> str:
    """The Authorization value that redeems `token` (RFC 9577 section 2.2)."""
    return f'{SCHEME} token="{b64url_e(token)}"'


_AUTH_PARAM = re.compile(r'\s*([A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*=\s*("[^"\\]*"|[A-Za-z0-9!#$%&\'*+.^_`|~-]+)\s*(?:,|$)')


def token_from_authorization(value: str) -> bytes | None:
    """The token of an `Authorization: PrivateToken token="..."` value; None for another scheme.
    Raises InvalidToken for a PrivateToken value without exactly one well-formed token."""
    scheme, _, params = value.strip().partition(" ")
    if scheme.lower() != SCHEME.lower():
        return None
    tokens = []
    position = 0
    params = params.strip()
    while position < len(params):
        match = _AUTH_PARAM.match(params, position)
        if match is None or match.end() == position:
            raise InvalidToken()
        name, raw = match.group(1), match.group(2)
        if name.lower() == "token":
            tokens.append(raw.strip('"'))
        position = match.end()
    if len(tokens) != 1:
        raise InvalidToken()
    try:
        return b64url_d(tokens[0])
    except Base64Error:
        raise InvalidToken() from None


# --- the token (RFC 9577 section 2.2) --------------------------------------------------------


@dataclass(frozen=True)
class Token:
    nonce: bytes
    challenge_digest: bytes
    token_key_id: bytes
    authenticator: bytes

    @classmethod
    def from_bytes(cls, data: bytes) -> Token:
        if len(data) != TOKEN_SIZE or int.from_bytes(data[:2], "big") != TOKEN_TYPE:
            raise InvalidToken()
        return cls(data[2:34], data[34:66], data[66:98], data[98:])

    @property
    def authenticator_input(self) -> bytes:
        """What the issuer's VOPRF evaluates: type | nonce | challenge_digest | token_key_id."""
        return authenticator_input(self.nonce, self.challenge_digest, self.token_key_id)

    def to_bytes(self) -> bytes:
        return self.authenticator_input + self.authenticator


def authenticator_input(nonce: bytes, challenge_digest: bytes, key_id: bytes) -> bytes:
    return struct.pack("!H", TOKEN_TYPE) + nonce + challenge_digest + key_id


# --- issuance messages (RFC 9578 section 5, and this node's batched form) -------------------


@dataclass(frozen=True)
class TokenRequest:
    truncated_key_id: int
    blinded: tuple[bytes, ...]  # each a serialised P-384 point, still unchecked
    batched: bool

    @classmethod
    def from_bytes(cls, data: bytes, max_batch: int) -> TokenRequest:
        """Either form, told apart by length (52 bytes is RFC 9578's single request; a batched
        request is 54 + 49k bytes). Raises InvalidTokenRequest, TokenBatchTooLarge."""
        if len(data) < SINGLE_REQUEST_SIZE or int.from_bytes(data[:2], "big") != TOKEN_TYPE:
            raise InvalidTokenRequest()
        if len(data) == SINGLE_REQUEST_SIZE:
            return cls(data[2], (data[3:],), False)
        (length,) = struct.unpack_from("!H", data, 3)
        elements = data[5:]
        if length != len(elements) or not elements or len(elements) % ELEMENT_SIZE:
            raise InvalidTokenRequest()
        count = len(elements) // ELEMENT_SIZE
        if count > max_batch:
            raise TokenBatchTooLarge()
        return cls(data[2], tuple(elements[i : i + ELEMENT_SIZE] for i in range(0, len(elements), ELEMENT_SIZE)), True)

    def to_bytes(self) -> bytes:
        head = struct.pack("!HB", TOKEN_TYPE, self.truncated_key_id)
        if not self.batched:
            return head + self.blinded[0]
        elements = b"".join(self.blinded)
        return head + struct.pack("!H", len(elements)) + elements


def token_response(evaluated: list[bytes], proof: bytes, batched: bool) -> bytes:
    if not batched:
        return evaluated[0] + proof
    elements = b"".join(evaluated)
    return struct.pack("!H", len(elements)) + elements + proof


def parse_token_response(data: bytes, count: int, batched: bool) -> tuple[list[bytes], bytes]:
    """(evaluated elements, proof) of a response to `count` blinded elements."""
    if batched:
        if len(data) < 2 or struct.unpack_from("!H", data)[0] != count * ELEMENT_SIZE:
            raise TokenIssuanceInvalid("token response does not answer the request")
        data = data[2:]
    if len(data) != count * ELEMENT_SIZE + PROOF_SIZE:
        raise TokenIssuanceInvalid("token response does not answer the request")
    elements = [data[i : i + ELEMENT_SIZE] for i in range(0, count * ELEMENT_SIZE, ELEMENT_SIZE)]
    return elements, data[count * ELEMENT_SIZE :]


# --- the issuer's key (node side) ------------------------------------------------------------


class IssuerKey:
    """One token key: DeriveKeyPair(seed, "PrivacyPass"); issues and checks tokens."""

    __slots__ = ("_evaluator", "created_at", "key_id", "public_key", "seed")

    def __init__(self, seed: bytes, created_at: float) -> None:
        self.seed = seed
        self.created_at = created_at
        self._evaluator = p384.Evaluator.from_seed(seed, KEY_INFO)
        self.public_key = self._evaluator.public_key.serialize()  # the TokenKey: SerializeElement(pkI)
        self.key_id = token_key_id(self.public_key)

    @classmethod
    def generate(cls, created_at: float) -> IssuerKey:
        return cls(random_bytes(KEY_SEED_SIZE), created_at)

    @property
    def truncated_key_id(self) -> int:
        return self.key_id[-1]

    def issue(self, request: TokenRequest) -> bytes:
        """BlindEvaluate every blinded element with one proof; the TokenResponse bytes.
        Raises InvalidTokenRequest for an element that is not a P-384 point."""
        try:
            blinded = [p384.BlindedInput.deserialize(element) for element in request.blinded]
        except ValueError:
            raise InvalidTokenRequest() from None
        if not request.batched:
            # voprf writes proof | element; RFC 9578 writes element | proof.
            output = self._evaluator.evaluate(blinded[0]).serialize()
            return token_response([output[PROOF_SIZE:]], output[:PROOF_SIZE], batched=False)
        output = self._evaluator.evaluate_batch(blinded).serialize()
        elements = output[PROOF_SIZE:]
        evaluated = [elements[i : i + ELEMENT_SIZE] for i in range(0, len(elements), ELEMENT_SIZE)]
        return token_response(evaluated, output[:PROOF_SIZE], batched=True)

    def authentic(self, token: Token) -> bool:
        """The token's authenticator is this key's VOPRF output for its input (constant time)."""
        expected = self._evaluator.evaluate_known_input(token.authenticator_input)
        return constant_time_equal(expected, token.authenticator)


# --- the client's side of issuance -----------------------------------------------------------


class PendingIssuance:
    """The client's state between its token request and the issuer's response."""

    def __init__(self, token_key: bytes, challenge: bytes, count: int, batched: bool | None = None) -> None:
        if count < 1:
            raise ValueError("ask for at least one token")
        try:
            self._public_key = p384.PublicKey.deserialize(token_key)
        except ValueError:
            raise TokenIssuanceInvalid("the token key is not a P-384 public key") from None
        self.key_id = token_key_id(token_key)
        self.challenge_digest = hashlib.sha256(challenge).digest()  # the TokenChallenge's bytes
        self.batched = count > 1 if batched is None else batched
        self._nonces = [random_bytes(NONCE_SIZE) for _ in range(count)]
        self._clients = []
        blinded = []
        for nonce in self._nonces:
            client, element = p384.Client.blind(authenticator_input(nonce, self.challenge_digest, self.key_id))
            self._clients.append(client)
            blinded.append(element.serialize())
        self.request = TokenRequest(self.key_id[-1], tuple(blinded), self.batched)

    def finalize(self, response: bytes) -> list[bytes]:
        """The tokens (Token bytes) once the issuer's proof verifies against the token key."""
        evaluated, proof = parse_token_response(response, len(self._nonces), self.batched)
        try:
            if self.batched:
                output = p384.VerifiableBatchOutput.deserialize(proof + b"".join(evaluated))
                authenticators = p384.Client.finalize_batch(self._clients, output, self._public_key)
            else:
                output = p384.VerifiableOutput.deserialize(proof + evaluated[0])
                authenticators = [self._clients[0].finalize(output, self._public_key)]
        except ValueError:
            raise TokenIssuanceInvalid("the issuer's proof does not verify against the attested token key") from None
        return [
            Token(nonce, self.challenge_digest, self.key_id, authenticator).to_bytes()
            for nonce, authenticator in zip(self._nonces, authenticators)
        ]
