"""A client that verifies the whole trust chain: attestation, key binding, signatures, receipts.

    from node.client import Client
    with Client("http://127.0.0.1:8080", allow_simulated=True) as client:
        resp = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        print(resp.choices[0].message.content, resp.receipt.events)

`ConfidentialClient` is the async (aiohttp) client, `Client` its synchronous wrapper.
"""

from attestation.errors import AttestationError

from ..errors import (
    BadSignature,
    EventAfterEnd,
    MissingField,
    MissingReceipt,
    PaddingMissing,
    ReceiptInvalid,
    ResponseDecryptionFailed,
    ResponseHashMismatch,
    TeeNodeError,
    TranscriptMismatch,
    VerificationError,
)
from ._async import AsyncStream, ConfidentialClient, make_policy
from ._sync import Client, Stream
from .credentials.privacy_pass import NoTokensLeft, PrivateTokens, Wallet
from .errors import *  # noqa: F403
from .errors import __all__ as _error_names
from .types import *  # noqa: F403
from .types import __all__ as _type_names

__all__ = [
    "AsyncStream",
    "AttestationError",
    "BadSignature",
    "Client",
    "ConfidentialClient",
    "EventAfterEnd",
    "MissingField",
    "MissingReceipt",
    "NoTokensLeft",
    "PaddingMissing",
    "PrivateTokens",
    "ReceiptInvalid",
    "ResponseDecryptionFailed",
    "ResponseHashMismatch",
    "Stream",
    "TeeNodeError",
    "TranscriptMismatch",
    "VerificationError",
    "Wallet",
    "make_policy",
    *_error_names,
    *_type_names,
]
