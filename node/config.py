"""Node configuration: defaults < TOML file (`--config`) < `TEE_NODE_*` environment < CLI flags.

Nested keys use `__` in the environment, e.g. `TEE_NODE_LIMITS__MAX_IN_FLIGHT=32`. The
digest of the config's measured part (`config_digest`) is what the attestation document
reports, so a client can pin the configuration a node runs.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal, Mapping
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from attestation.binding import config_digest
from attestation.producers.nvidia_collateral import DEFAULT_OCSP_URL, DEFAULT_RIM_SERVICE_URL

TeeMode = Literal["simulated", "tdx", "sev-snp"]
EngineKind = Literal["vllm", "upstream", "echo"]

REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"
DEFAULT_CONFIG = REPO_CONFIGS / "simulated.toml"
EMBEDDED_CHAT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
# Every log line of the node, vLLM's included.
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


UNIX_SOCKET_PREFIX = "unix:"


def is_local_upstream(url: str) -> bool:
    """True for a unix socket (`unix:/path`) or an http(s) URL to a loopback host."""
    if url.startswith(UNIX_SOCKET_PREFIX):
        return url[len(UNIX_SOCKET_PREFIX):].startswith("/")
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        return False
    return _is_loopback_host(parsed.hostname)


def _is_loopback_host(host: str) -> bool:
    """A loopback address, or `localhost` (resolved by the VM's own measured /etc/hosts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tee-node"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# Pixels per side at most: width x height x n stays within the receipt's 32-bit usage counts.
MAX_IMAGE_SIDE = 4096
MAX_IMAGES_PER_REQUEST = 16


def parse_image_size(size: str) -> tuple[int, int] | None:
    """(width, height) of a "WxH" size within MAX_IMAGE_SIDE, or None."""
    width, sep, height = size.partition("x")
    if not sep or not (width.isascii() and width.isdigit() and height.isascii() and height.isdigit()):
        return None
    w, h = int(width), int(height)
    return (w, h) if 0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE else None


class ModelConfig(_Section):
    """One served model. `source` is `embedded:smollm2`, `embedded:minilm`, a local directory
    or a model name vLLM can load; `name` is what clients put in `model`. With `task = "image"`
    `source` is a directory holding a diffusers pipeline (`model_index.json`)."""

    name: str
    source: str
    task: Literal["generate", "embed", "image"] = "generate"
    dtype: str = "auto"
    max_model_len: int | None = Field(default=None, ge=16)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(default=1, ge=1)
    pipeline_parallel_size: int = Field(default=1, ge=1)
    distributed_executor_backend: Literal["mp", "ray", "uni", "external_launcher"] | None = None
    # Anything else vLLM's AsyncEngineArgs takes, passed through unchanged; for an image model,
    # keyword arguments of the pipeline's call (num_inference_steps, guidance_scale, ...).
    engine_args: dict[str, Any] = Field(default_factory=dict)
    # Image models: the sizes served ("WxH"), the first being the default; empty: the
    # pipeline's own default size only (an upstream's image model: any size it accepts).
    sizes: list[str] = Field(default_factory=list)
    # Image models: most images one request may ask for (`n`).
    max_images: int = Field(default=4, ge=1, le=MAX_IMAGES_PER_REQUEST)

    @field_validator("sizes")
    @classmethod
    def _image_sizes(cls, values: list[str]) -> list[str]:
        for value in values:
            if parse_image_size(value) is None:
                raise ValueError(f"sizes: {value!r} is not WIDTHxHEIGHT with each side 1..{MAX_IMAGE_SIDE}")
        return list(dict.fromkeys(values))

    @model_validator(mode="after")
    def _image_fields_for_images(self) -> ModelConfig:
        default_max = type(self).model_fields["max_images"].default
        if self.task != "image" and (self.sizes or self.max_images != default_max):
            raise ValueError(f"model {self.name!r}: sizes and max_images are for task = \"image\" models only")
        return self


def _default_models() -> list[ModelConfig]:
    return [
        ModelConfig(name=EMBEDDED_CHAT_MODEL, source="embedded:smollm2", dtype="float32", max_model_len=2048),
        ModelConfig(name=EMBEDDED_EMBEDDING_MODEL, source="embedded:minilm", task="embed", dtype="float32"),
    ]


class EngineConfig(_Section):
    kind: EngineKind = "vllm"
    models: list[ModelConfig] = Field(default_factory=_default_models)
    # UpstreamEngine: an OpenAI-compatible server inside the same confidential VM, by a
    # loopback URL (http://127.0.0.1:8000) or a unix socket (unix:/run/vllm.sock).
    upstream_url: str | None = None
    upstream_api_key: str | None = Field(default=None, repr=False)
    upstream_timeout: float = Field(default=600.0, gt=0)
    # EchoEngine only: seconds between streamed tokens (reliability tests, benchmarks).
    echo_token_delay: float = Field(default=0.0, ge=0)

    @model_validator(mode="after")
    def _upstream_needs_url(self) -> EngineConfig:
        if self.kind == "upstream" and not self.upstream_url:
            raise ValueError("engine.kind = 'upstream' needs engine.upstream_url")
        return self


class PrivacyPassConfig(_Section):
    """Anonymous tokens (docs/privacy-pass.md): the node issues them to accounts (bearer tokens)
    and accepts them in place of a bearer token."""

    enabled: bool = False
    # Tokens one account (one bearer token) may be issued per hour, over all its requests.
    tokens_per_hour: int = Field(default=1000, ge=1)
    # Tokens one token request may ask for.
    max_batch: int = Field(default=100, ge=1, le=1000)
    # The token key is replaced this often; the previous one keeps redeeming for `key_overlap`
    # (a client's unspent tokens), then retires with its spent-nonce set.
    key_rotation_interval: float = Field(default=7 * 24 * 3600.0, gt=0)
    key_overlap: float = Field(default=24 * 3600.0, ge=0)
    # The issuer name in the node's TokenChallenge (RFC 9577): one fixed challenge for every
    # client, so tokens fetched ahead of time redeem and the challenge tells no client apart.
    issuer_name: str = Field(default="tee-node", min_length=1, max_length=255)


class AuthConfig(_Section):
    # SHA-256 (hex) of each accepted bearer token; the tokens themselves are never stored.
    api_token_sha256: list[str] = Field(default_factory=list)
    # Ed25519 public keys (base64) of proxies whose X-Signature is required when any is set.
    trusted_proxy_keys: list[str] = Field(default_factory=list)
    # /metrics without a token even when tokens are required (a scraper on a private network).
    metrics_public: bool = False
    privacy_pass: PrivacyPassConfig = Field(default_factory=PrivacyPassConfig)

    @field_validator("api_token_sha256")
    @classmethod
    def _hex_digests(cls, values: list[str]) -> list[str]:
        for value in values:
            if len(value) != 64 or any(c not in "0123456789abcdef" for c in value.lower()):
                raise ValueError("api_token_sha256 entries must be 64 hex characters")
        return [v.lower() for v in values]


class LimitsConfig(_Section):
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    max_in_flight: int = Field(default=64, ge=1)
    max_queue: int = Field(default=256, ge=0)
    queue_timeout: float = Field(default=30.0, gt=0)
    retry_after: int = Field(default=1, ge=1)
    # Seconds a client may take to send its body; a slow client cannot hold a slot.
    read_timeout: float = Field(default=30.0, gt=0)
    # Seconds a connection may stay idle or take to send a request's headers before the node
    # closes it (slowloris): aiohttp's keep-alive timeout, which also runs while headers arrive.
    header_timeout: float = Field(default=15.0, gt=0)
    keepalive_interval: float = Field(default=15.0, gt=0)
    # Engine chunks merged into one sealed event when a confidential stream falls behind
    # (1: one event per chunk). Plain routes always send one event per chunk.
    stream_coalesce_max: int = Field(default=16, ge=1, le=1024)
    # Timing cover (off when None): a confidential stream sends one event every this many ms,
    # carrying the text ready by then or none, so event timing does not follow token timing.
    stream_cadence_ms: int | None = Field(default=None, ge=1, le=10_000)
    # Attestation documents a minute: all clients together, and each client (an API token,
    # else an address), so one client's burst leaves the rest for the others.
    attestation_per_minute: int = Field(default=120, ge=1)
    attestation_per_client_per_minute: int = Field(default=30, ge=1)


class PrivacyConfig(_Section):
    # What a confidential answer's clear `usage` (and its receipt) shows: counts rounded up to
    # the next power of two, at least 16 ("bucketed"), the exact counts, or none (null).
    # The exact usage always travels inside the encrypted answer.
    clear_usage: Literal["bucketed", "exact", "none"] = "bucketed"


class KeysConfig(_Section):
    rotation_interval: float = Field(default=3600.0, gt=0)
    overlap: float = Field(default=300.0, ge=0)
    replay_capacity: int = Field(default=500_000, ge=1)


class TlsConfig(_Section):
    # HTTPS with a key made at start (memory only) in a self-signed certificate that the
    # attestation binds. None: on in the real TEE modes, off in simulated (`serve --tls`).
    enabled: bool | None = None
    # Names (DNS names or IPs) in the certificate, for clients that check the name against a
    # trusted copy of it (curl --cacert, httpx verify=...); tee-node clients pin its hash.
    names: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1", "::1"])


class AttestationConfig(_Section):
    # Simulated mode keeps its software root of trust here (0600), unless a seed is set.
    state_dir: Path = Field(default_factory=lambda: default_cache_dir() / "state")
    simulated_seed: str | None = Field(default=None, repr=False)
    # The simulated TD report sets TD_ATTRIBUTES.DEBUG, as a debuggable TD would (clients refuse it).
    simulated_debug: bool = False
    require_gpu: bool = False
    configfs_tsm_path: Path = Path("/sys/kernel/config/tsm/report")
    # NVIDIA GPU collateral shipped in the document: RIMs named <RIM id>.swidtag and OCSP
    # responses (*.ocsp) in gpu_rim_dir come first (offline sites), then the RIM cache and
    # NVIDIA's RIM and OCSP services.
    gpu_rim_dir: Path | None = None
    nvidia_rim_service_url: str = DEFAULT_RIM_SERVICE_URL
    nvidia_ocsp_url: str = DEFAULT_OCSP_URL
    gpu_collateral_refresh: float = Field(default=3600.0, gt=0)
    # Vendor collateral bundled in the attestation document (docs/policy.md lists the files).
    collateral_dir: Path | None = None  # read at start: offline sites and tests
    fetch_collateral: bool = True  # real TEE modes: fetch from Intel PCS / AMD KDS at start and before expiry
    pcs_url: str = "https://api.trustedservices.intel.com"
    intel_root_crl_url: str = "https://certificates.trustedservices.intel.com/IntelSGXRootCA.der"
    kds_url: str = "https://kdsintf.amd.com"
    collateral_refresh: float = Field(default=3600.0, gt=0)  # at most this long between refreshes
    collateral_retry: float = Field(default=60.0, gt=0)  # after a failed fetch
    # The Sigstore bundle of the release this node runs (docs/releases.md), served verbatim in the
    # document's release_bundle. Clients check it against the measurements; it is never measured
    # itself (the release pins the config digest, which therefore cannot contain the release).
    release_bundle: Path | None = None


class WorkersConfig(_Section):
    """Worker VMs that run later pipeline stages of the model (`tee-node worker`), each admitted
    only once its evidence passes the worker policy, and reached only over a WireGuard link."""

    # How many worker VMs must join before the model loads (0: a single-VM node).
    count: int = Field(default=0, ge=0)
    # The policy a worker's evidence must pass (docs/policy.md). None: the head's own release,
    # that is, every register of the head's own evidence and its config digest.
    policy: Path | None = None
    # The WireGuard link: the head's address on it (workers get the next ones), its UDP port,
    # the interface name, and the port of vLLM's rendezvous on the head's link address.
    link_address: str = "10.99.0.1/24"
    link_port: int = Field(default=51820, ge=1, le=65535)
    link_interface: str = "tee-link0"
    rendezvous_port: int = Field(default=29501, ge=1, le=65535)
    # Seconds a join challenge stays valid.
    challenge_ttl: float = Field(default=120.0, gt=0)


class NodeConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TEE_NODE_", env_nested_delimiter="__", extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    tee_mode: TeeMode = "simulated"
    # Plain OpenAI routes (/v1/chat/completions ...) bypass the envelope: off unless asked for.
    allow_plaintext: bool = False
    node_small_id: int = Field(default=0, ge=0)
    log_level: str = "INFO"
    shutdown_grace: float = Field(default=30.0, ge=0)
    cache_dir: Path = Field(default_factory=default_cache_dir)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    keys: KeysConfig = Field(default_factory=KeysConfig)
    privacy: PrivacyConfig = Field(default_factory=PrivacyConfig)
    tls: TlsConfig = Field(default_factory=TlsConfig)
    attestation: AttestationConfig = Field(default_factory=AttestationConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)

    @model_validator(mode="after")
    def _privacy_pass_needs_accounts(self) -> NodeConfig:
        if self.auth.privacy_pass.enabled and not self.auth.api_token_sha256:
            raise ValueError(
                "auth.privacy_pass.enabled needs auth.api_token_sha256: tokens are issued to accounts, "
                "and a node open to everyone has nothing for a token to stand in for"
            )
        return self

    @property
    def tls_enabled(self) -> bool:
        return self.tls.enabled if self.tls.enabled is not None else self.tee_mode != "simulated"

    @model_validator(mode="after")
    def _tee_rules(self) -> NodeConfig:
        if self.workers.count and (self.engine.kind != "vllm" or len(self.engine.models) != 1):
            raise ValueError("workers.count > 0 needs engine.kind = 'vllm' and exactly one model (the one split over the VMs)")
        if self.tee_mode != "simulated":
            if not self.auth.api_token_sha256:
                raise ValueError("a TEE mode needs at least one api token: open access is simulated-only")
            if self.engine.kind == "echo":
                raise ValueError("the echo engine cannot serve in a TEE mode")
            if not self.tls_enabled and not _is_loopback_host(self.host):
                raise ValueError(
                    f"tls.enabled = false with host {self.host!r}: in a TEE mode plain HTTP is only for a "
                    "TLS-terminating proxy inside the same TEE, so listen on loopback (host = \"127.0.0.1\") "
                    "or leave TLS on (attested TLS: the node's certificate is bound into its attestation)"
                )
            if self.engine.kind == "upstream" and not is_local_upstream(self.engine.upstream_url or ""):
                raise ValueError(
                    f"engine.upstream_url {self.engine.upstream_url!r} is not a loopback address or a unix socket: "
                    "in a TEE mode the node sends decrypted prompts to the upstream in clear, so it must run in "
                    "the same confidential VM (http://127.0.0.1:PORT, http://[::1]:PORT, http://localhost:PORT or "
                    "unix:/path/to/socket)"
                )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if _toml_path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=_toml_path))
        return tuple(sources)

    def measured_config(self, weights_sha256: Mapping[str, str | None]) -> dict[str, Any]:
        """The measured part (docs/protocol.md): what changes what the node does to a request.

        `weights_sha256` gives each served model's weight-manifest digest (known once the engine
        has prepared its models; None where the node does not hold the weights: upstream, echo).
        Never a secret (token digests, upstream key, seeds) nor a host-local value (paths, host,
        port, log level, URLs), so two hosts with the same config file report the same digest.
        The three parts of the config are listed in docs/configuration.md.
        """
        measured: dict[str, Any] = {
            "tee_mode": self.tee_mode,
            "allow_plaintext": self.allow_plaintext,
            "tokens_required": bool(self.auth.api_token_sha256),
            "privacy_pass": self.auth.privacy_pass.enabled,
            "clear_usage": self.privacy.clear_usage,
            "trusted_proxy_keys": sorted(self.auth.trusted_proxy_keys),
            "engine": {
                "kind": self.engine.kind,
                "models": [
                    {
                        **m.model_dump(mode="json", include=_MEASURED_MODEL_FIELDS[m.task == "image"]),
                        "weights_sha256": weights_sha256.get(m.name),
                    }
                    for m in self.engine.models
                ],
            },
            "limits": {
                "max_body_bytes": self.limits.max_body_bytes,
                "stream_coalesce_max": self.limits.stream_coalesce_max,
                "stream_cadence_ms": self.limits.stream_cadence_ms,
            },
            "attestation": {"require_gpu": self.attestation.require_gpu},
        }
        if self.workers.count:
            # How many VMs hold the model (absent for one VM, so single-VM digests stay as they were).
            measured["workers"] = {"count": self.workers.count}
        return measured

    def digest(self, weights_sha256: Mapping[str, str | None]) -> bytes:
        """The config digest the attestation reports: SHA-256 of the measured part's canonical JSON."""
        return config_digest(self.measured_config(weights_sha256))


# What the measured config names of a model: text models as before image models existed (their
# digests stay what they were), image models also what they answer (sizes, most images).
_MEASURED_MODEL_FIELDS = {
    False: {"name", "task", "dtype", "max_model_len", "engine_args"},
    True: {"name", "task", "dtype", "max_model_len", "engine_args", "sizes", "max_images"},
}

_toml_path: Path | None = None


def merge_settings(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """`update` over `base`, section by section (nested dicts merge, other values replace)."""
    merged = dict(base)
    for key, value in update.items():
        nested = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = merge_settings(merged[key], value) if nested else value
    return merged


def load_config(path: str | Path | None = None, **overrides: Any) -> NodeConfig:
    """Defaults, then the TOML file (`configs/simulated.toml` when none is given), then the
    environment, then `overrides` (CLI flags; None values are ignored)."""
    global _toml_path
    _toml_path = Path(path) if path is not None else DEFAULT_CONFIG
    if not _toml_path.is_file():
        raise FileNotFoundError(f"config file not found: {_toml_path}")
    try:
        return NodeConfig(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _toml_path = None
