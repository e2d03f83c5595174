"""Wire models: the Atoma confidential-compute schemas (atoma-node's OpenAPI) and this node's additions.

Outer models are validated strictly (no string-to-int coercion: Atoma's schemas say integer and
string), unknown fields are ignored as Atoma's serde does. The OpenAI plaintext models check
only what the node itself relies on and pass everything else through to the engine.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1

NonNegInt64 = Annotated[int, Field(ge=0, le=INT64_MAX)]
NonNegInt32 = Annotated[int, Field(ge=0, le=INT32_MAX)]


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class ConfidentialComputeRequest(_Wire):
    """A request for confidential computation that includes encrypted data and associated cryptographic parameters"""

    ciphertext: str = Field(description="The encrypted payload that needs to be processed (base64 encoded)")
    client_dh_public_key: str = Field(description="Client's public key for Diffie-Hellman key exchange (base64 encoded)")
    model_name: str = Field(description="Model name")
    node_dh_public_key: str = Field(description="Node's public key for Diffie-Hellman key exchange (base64 encoded)")
    nonce: str = Field(description="Cryptographic nonce used for encryption (base64 encoded)")
    num_compute_units: NonNegInt64 | None = Field(
        default=None,
        description="Number of compute units to be used for the request, for image generations,\n"
        "as this value is known in advance (the number of pixels to generate)",
    )
    plaintext_body_hash: str = Field(
        description="Hash of the original plaintext body for integrity verification (base64 encoded)"
    )
    salt: str = Field(description="Salt value used in key derivation (base64 encoded)")
    stack_small_id: NonNegInt64 = Field(description="Unique identifier for the small stack being used")
    stream: bool | None = Field(default=None, description="Indicates whether this is a streaming request")
    kem_ciphertext: str | None = Field(
        default=None,
        description="tee-node (docs/protocol.md): ML-KEM-768 ciphertext to the node's kem_public_key "
        "(base64, 1088 bytes); the key then comes from the hybrid ML-KEM-768 + X25519 derivation",
    )


class CompletionTokensDetails(_Wire):
    """The details of the completion tokens"""

    accepted_prediction_tokens: NonNegInt32 = Field(description="The number of tokens in the completion")
    audio_tokens: NonNegInt32 = Field(description="The number of audio tokens")
    reasoning_tokens: NonNegInt32 = Field(description="The number of reasoning tokens")
    rejected_prediction_tokens: NonNegInt32 = Field(description="The number of rejected prediction tokens")


class PromptTokensDetails(_Wire):
    audio_tokens: NonNegInt32 = Field(description="The number of audio tokens")
    cached_tokens: NonNegInt32 = Field(description="The number of cached tokens")


class Usage(_Wire):
    completion_tokens: NonNegInt32 = Field(description="The number of completion tokens used")
    completion_tokens_details: CompletionTokensDetails = Field(description="The details of the completion tokens")
    prompt_tokens: NonNegInt32 = Field(description="The number of prompt tokens used")
    prompt_tokens_details: PromptTokensDetails = Field(description="The details of the prompt tokens")
    total_tokens: NonNegInt32 = Field(description="The total number of tokens used")

    @classmethod
    def from_openai(cls, usage: dict[str, Any]) -> Usage:
        """The seeds' Usage (all detail fields present) from an engine's OpenAI usage object."""
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        prompt_details = usage.get("prompt_tokens_details") or {}
        completion_details = usage.get("completion_tokens_details") or {}
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=int(usage.get("total_tokens") or prompt + completion),
            prompt_tokens_details=PromptTokensDetails(
                audio_tokens=int(prompt_details.get("audio_tokens") or 0),
                cached_tokens=int(prompt_details.get("cached_tokens") or 0),
            ),
            completion_tokens_details=CompletionTokensDetails(
                accepted_prediction_tokens=int(completion_details.get("accepted_prediction_tokens") or 0),
                audio_tokens=int(completion_details.get("audio_tokens") or 0),
                reasoning_tokens=int(completion_details.get("reasoning_tokens") or 0),
                rejected_prediction_tokens=int(completion_details.get("rejected_prediction_tokens") or 0),
            ),
        )


class Receipt(_Wire):
    """The receipt: binds a response to its request, its full event transcript and its usage."""

    version: Literal[1] = 1
    request_hash: str
    transcript_hash: str
    events: NonNegInt64
    model: str
    usage: Usage | None = None
    key_epoch: NonNegInt64
    signature: str


class ConfidentialComputeResponse(_Wire):
    """Represents a response from a confidential compute request"""

    ciphertext: str = Field(description="Encrypted response body (base64 encoded)")
    nonce: str = Field(description="Nonce used for encryption (base64 encoded)")
    response_hash: str | None = Field(default=None, description="Hash of the response body (base64 encoded)")
    signature: str | None = Field(default=None, description="Signature of the response body (base64 encoded)")
    usage: Usage | None = Field(default=None, description="Usage statistics for the request")
    receipt: Receipt | None = Field(default=None, description="tee-node receipt (docs/protocol.md)")


class ConfidentialComputeStreamResponse(ConfidentialComputeResponse):
    """One server-sent event of a confidential stream (same fields as the response)."""


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")

    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class NodesCreateLockRequest(_Wire):
    model: str
    max_num_tokens: NonNegInt64 | None = None
    timeout: NonNegInt64 | None = None


class NodesCreateLockResponse(BaseModel):
    public_key: str
    node_small_id: int
    stack_entry_digest: str | None = None
    stack_small_id: int
    kem_public_key: str | None = Field(
        default=None, description="tee-node (docs/protocol.md): the ML-KEM-768 encapsulation key of the same epoch"
    )


# The decrypted plaintext: OpenAI request bodies. Only the fields the node acts on are typed;
# the rest passes to the engine, which owns sampling parameters and their validation.
class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: Any = None


class ChatCompletionRequest(_OpenAIRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None


class CompletionRequest(_OpenAIRequest):
    prompt: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | Annotated[
        list[list[int]], Field(min_length=1)
    ]
    max_tokens: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None


class EmbeddingRequest(_OpenAIRequest):
    input: str | Annotated[list[str], Field(min_length=1)] | Annotated[list[int], Field(min_length=1)] | Annotated[
        list[list[int]], Field(min_length=1)
    ]


class ImageGenerationRequest(_OpenAIRequest):
    """OpenAI's image request. `quality`, `style` and `user` are taken and not acted on (a
    diffusion pipeline has no such knobs); an image is never stored, so `url` answers carry
    the PNG itself as a data URL."""

    prompt: Annotated[str, Field(min_length=1)]
    n: Annotated[int, Field(ge=1, le=INT32_MAX)] | None = None
    size: str | None = None
    response_format: Literal["url", "b64_json"] | None = None
    quality: str | None = None
    style: str | None = None
    user: str | None = None
