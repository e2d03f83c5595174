"""OpenAI-shaped response objects (attribute access, unknown fields kept) plus what was verified.

Every object built from a node answer was decrypted and checked first; `receipt` is the
node's signed receipt after verification and `attestation` the evidence the keys came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

from ..protocol import Receipt


PNG_DATA_URL_PREFIX = "data:image/png;base64,"


class _Obj(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=False)


@dataclass(frozen=True)
class NodeIdentity:
    """What the client verified about the node before sending it anything."""

    tee: str
    simulated: bool
    measurement: str
    key_epoch: int
    config_digest: str
    dh_public_key: bytes = field(repr=False)
    signing_public_key: bytes = field(repr=False)
    verified_at: datetime
    kem_public_key: bytes | None = field(default=None, repr=False)  # ML-KEM-768, when the node offers one
    tcb_status: str | None = None
    gpu_devices: int = 0
    notes: tuple[str, ...] = ()
    claims: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)  # every appraised claim, hex
    # Attested TLS: the certificate (DER) the node presented and the attestation binds, pinned
    # for every later connection; None over plain HTTP.
    tls_cert_sha256: bytes | None = field(default=None, repr=False)
    tls_certificate: bytes | None = field(default=None, repr=False, compare=False)
    document: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    # The release the node serves, when the policy has [release] and its bundle verified:
    # version, source (repository, commit), identity (the signer) and log_index.
    release: dict[str, Any] | None = field(default=None, compare=False)
    # Every VM that holds the model: the head first, then each worker VM, each verified and
    # appraised under the same policy (a multi-VM node; one entry for a single VM).
    vms: tuple[dict[str, Any], ...] = ()

    def summary(self) -> dict[str, Any]:
        import base64

        return {
            "tee": self.tee,
            "simulated": self.simulated,
            "measurement": self.measurement,
            "key_epoch": self.key_epoch,
            "config_digest": self.config_digest,
            "dh_public_key": base64.b64encode(self.dh_public_key).decode(),
            "signing_public_key": base64.b64encode(self.signing_public_key).decode(),
            "kem_public_key": base64.b64encode(self.kem_public_key).decode() if self.kem_public_key else None,
            "verified_at": self.verified_at.isoformat(),
            "tcb_status": self.tcb_status,
            "gpu_devices": self.gpu_devices,
            "notes": list(self.notes),
            "claims": self.claims,
            "tls_cert_sha256": self.tls_cert_sha256.hex() if self.tls_cert_sha256 else None,
            "release": self.release,
            "vms": list(self.vms),
        }


class CompletionUsage(_Obj):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class _Verified(_Obj):
    """Mixed into every top-level response: the verified receipt and the attested identity."""

    receipt: Receipt | None = None
    attestation: NodeIdentity | None = None


class ChatCompletionMessage(_Obj):
    role: str = "assistant"
    content: str | None = None


class Choice(_Obj):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str | None = None


class ChatCompletion(_Verified):
    id: str = ""
    object: str = "chat.completion"
    created: int = 0
    model: str = ""
    choices: list[Choice] = []
    usage: CompletionUsage | None = None


class ChoiceDelta(_Obj):
    role: str | None = None
    content: str | None = None


class ChunkChoice(_Obj):
    index: int = 0
    delta: ChoiceDelta = ChoiceDelta()
    finish_reason: str | None = None


class ChatCompletionChunk(_Obj):
    id: str = ""
    object: str = "chat.completion.chunk"
    created: int = 0
    model: str = ""
    choices: list[ChunkChoice] = []
    usage: CompletionUsage | None = None


class CompletionChoice(_Obj):
    index: int = 0
    text: str = ""
    finish_reason: str | None = None
    logprobs: Any = None


class Completion(_Verified):
    """A text completion, and also each chunk of a streamed one (as in OpenAI's API)."""

    id: str = ""
    object: str = "text_completion"
    created: int = 0
    model: str = ""
    choices: list[CompletionChoice] = []
    usage: CompletionUsage | None = None


class Embedding(_Obj):
    object: str = "embedding"
    index: int = 0
    embedding: list[float] | str = []


class EmbeddingUsage(_Obj):
    prompt_tokens: int = 0
    total_tokens: int = 0


class CreateEmbeddingResponse(_Verified):
    object: str = "list"
    data: list[Embedding] = []
    model: str = ""
    usage: EmbeddingUsage | None = None


class ImageData(_Obj):
    """One image: a PNG as a data URL (`url`) or as base64 (`b64_json`)."""

    url: str | None = None
    b64_json: str | None = None
    revised_prompt: str | None = None

    def png(self) -> bytes:
        """The image's PNG bytes, from whichever field carries it."""
        import base64

        encoded = self.b64_json
        if encoded is None and self.url is not None and self.url.startswith(PNG_DATA_URL_PREFIX):
            encoded = self.url[len(PNG_DATA_URL_PREFIX):]
        if encoded is None:
            raise ValueError("the image carries no PNG (neither b64_json nor a data:image/png URL)")
        return base64.b64decode(encoded, validate=True)


class ImageUsage(_Obj):
    """Compute units: width x height x n."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ImagesResponse(_Verified):
    created: int = 0
    data: list[ImageData] = []
    usage: ImageUsage | None = None


class Model(_Obj):
    id: str
    object: str = "model"
    created: int = 0
    owned_by: str = ""


class ModelList(_Obj):
    object: str = "list"
    data: list[Model] = []


__all__ = [
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatCompletionMessage",
    "Choice",
    "ChoiceDelta",
    "ChunkChoice",
    "Completion",
    "CompletionChoice",
    "CompletionUsage",
    "CreateEmbeddingResponse",
    "Embedding",
    "EmbeddingUsage",
    "ImageData",
    "ImageUsage",
    "ImagesResponse",
    "Model",
    "ModelList",
    "NodeIdentity",
    "Receipt",
]
