"""The attestation document of GET /v1/attestation: build it on the node, verify it on a client."""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from . import binding, sevsnp, tdx
from .appraisal import Policy, appraise, appraised_claims
from .claims import Claims, GpuClaims, ReleaseClaims
from .collateral import AmdCollateral, LocalCollateral
from .errors import (
    AttestationError,
    DocumentInvalid,
    GpuEvidenceInvalid,
    NonceMismatch,
    ParseError,
    PolicyRefused,
    ReportDataMismatch,
    TlsCertificateMismatch,
)
from .evidence import FORMAT_NVIDIA, FORMAT_SNP, FORMAT_TDX, GpuProvider, TeeProvider
from .fields import b64_bytes, b64_text, hex_bytes
from .intel import IntelCollateral
from .nvidia.verify import verify_gpu_report
from .workers import WorkerEntry

# The version the node serves; a client verifies both.
DOCUMENT_VERSION = 3
DOCUMENT_VERSIONS = (2, 3)
TEE_TYPES = ("tdx", "sev-snp", "simulated")
_TEE_FORMAT = {"tdx": FORMAT_TDX, "simulated": FORMAT_TDX, "sev-snp": FORMAT_SNP}


def empty_collateral() -> dict[str, Any]:
    """The v2 `collateral` object when no vendor collateral is at hand."""
    return {"intel": None, "amd": None, "nvidia": None}


def build_document(
    provider: TeeProvider,
    gpu_provider: GpuProvider | None,
    *,
    nonce: bytes,
    dh_public_key: bytes,
    signing_public_key: bytes,
    key_epoch: int,
    measured_config: dict[str, Any],
    kem_public_key: bytes | None = None,
    tls_cert_sha256: bytes | None = None,
    collateral: dict[str, Any] | None = None,
    public_keys: dict[str, str | None] | None = None,
    workers: list[dict[str, Any]] | None = None,
    release_bundle: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The v3 document; `config_digest` is computed from `measured_config`.

    `public_keys` (OHTTP key configuration, Privacy Pass token key) and `workers` (the other VMs'
    verified documents) are bound into report_data; `release_bundle` is public and
    self-authenticating, so it travels unbound.
    """
    public_keys = {**binding.empty_public_keys(), **(public_keys or {})}
    gpu_evidence: list[dict[str, Any]] = []
    if gpu_provider is not None:
        gpu_nonce = binding.gpu_nonce(nonce=nonce, dh_public_key=dh_public_key, signing_public_key=signing_public_key)
        gpu_evidence = gpu_provider.get_evidence(gpu_nonce)
    config_digest = binding.config_digest(measured_config)
    report_data = binding.report_data(
        nonce=nonce,
        dh_public_key=dh_public_key,
        signing_public_key=signing_public_key,
        key_epoch=key_epoch,
        config_digest=config_digest,
        gpu_evidence=gpu_evidence,
        kem_public_key=kem_public_key,
        tls_cert_sha256=tls_cert_sha256,
        public_keys=public_keys,
        workers=workers,
    )
    evidence = provider.get_evidence(report_data)
    return {
        "version": DOCUMENT_VERSION,
        "tee": evidence.tee,
        "simulated": evidence.simulated,
        "nonce": nonce.hex(),
        "dh_public_key": b64_text(dh_public_key),
        "signing_public_key": b64_text(signing_public_key),
        "key_epoch": key_epoch,
        "config_digest": config_digest.hex(),
        "report_data": report_data.hex(),
        "cpu_evidence": {"format": evidence.format, "quote": b64_text(evidence.quote), "certificates": evidence.certificates},
        "gpu_evidence": gpu_evidence,
        "kem_public_key": b64_text(kem_public_key) if kem_public_key is not None else None,
        "tls_cert_sha256": tls_cert_sha256.hex() if tls_cert_sha256 is not None else None,
        "measured_config": measured_config,
        "collateral": collateral if collateral is not None else empty_collateral(),
        "release_bundle": release_bundle,
        "public_keys": public_keys,
        "workers": workers,
    }


@dataclass(frozen=True)
class VerifiedAttestation:
    """An authentic document whose claims the policy accepted."""

    tee: str
    simulated: bool
    dh_public_key: bytes
    signing_public_key: bytes
    key_epoch: int
    config_digest: bytes
    measured_config: dict[str, Any]
    kem_public_key: bytes | None
    tls_cert_sha256: bytes | None
    collateral: dict[str, Any]
    claims: Claims
    version: int = DOCUMENT_VERSION
    # v3: the node's other public keys (b64 or None), bound through report_data; a v2 document has none.
    public_keys: dict[str, str | None] = field(default_factory=binding.empty_public_keys)
    workers: list[dict[str, Any]] | None = None
    release_bundle: dict[str, Any] | None = None
    # Each worker VM's own verified evidence, in `workers` order (appraised by verify_document).
    worker_attestations: tuple["VerifiedAttestation", ...] = ()
    gpu_devices: int = 0
    gpu_verified: bool = False  # the document has GPU evidence and every entry verified (acceptance: appraise)
    notes: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())  # accepted, but the caller should know (e.g. unpinned)

    @property
    def measurement(self) -> str:
        """Hex MRTD (TDX, simulated) or MEASUREMENT (SEV-SNP)."""
        return self.claims.cpu.measurement.hex()

    @property
    def tcb_status(self) -> str:
        return self.claims.cpu.tcb_status

    @property
    def release(self) -> ReleaseClaims | None:
        """The release the node serves, verified (only when the policy has `[release]`)."""
        return self.claims.release


def _field(doc: dict[str, Any], name: str, kind: type) -> Any:
    value = doc.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DocumentInvalid(f"document field {name!r} is missing or not a {kind.__name__}")
    return value


def _hex(doc: dict[str, Any], name: str, size: int) -> bytes:
    return hex_bytes(_field(doc, name, str), f"document field {name!r}", size)


def _unb64(doc: dict[str, Any], name: str, size: int | None = None) -> bytes:
    return _b64_value(_field(doc, name, str), name, size)


def _b64_value(text: Any, name: str, size: int | None = None) -> bytes:
    return b64_bytes(text, f"document field {name!r}", size)


def _optional(doc: dict[str, Any], name: str, decode) -> Any:
    """A v2 field that must be present and may be null."""
    if name not in doc:
        raise DocumentInvalid(f"document field {name!r} is missing")
    return None if doc[name] is None else decode(doc, name)


def _collateral(doc: dict[str, Any]) -> dict[str, Any]:
    collateral = _field(doc, "collateral", dict)
    for vendor, kind in (("intel", dict), ("amd", dict), ("nvidia", list)):
        if vendor not in collateral or not isinstance(collateral[vendor], (kind, type(None))):
            raise DocumentInvalid(f"document collateral.{vendor} must be {'an object' if kind is dict else 'a list'} or null")
    return collateral


def _v3_fields(doc: dict[str, Any]) -> tuple[dict[str, str | None], list[dict[str, Any]] | None, dict[str, Any] | None]:
    """`public_keys`, `workers` and `release_bundle` of a v3 document, checked for shape only:
    the first two are authenticated through report_data, the bundle by its own signatures."""
    public_keys = _field(doc, "public_keys", dict)
    if set(public_keys) != set(binding.PUBLIC_KEY_NAMES):
        raise DocumentInvalid(f"document public_keys must have exactly the keys {', '.join(binding.PUBLIC_KEY_NAMES)}")
    for name, value in public_keys.items():
        if value is not None:
            _b64_value(value, f"public_keys.{name}")
    workers = _optional(doc, "workers", lambda d, n: _field(d, n, list))
    if workers is not None and not all(isinstance(worker, dict) for worker in workers):
        raise DocumentInvalid("document workers must be a list of objects or null")
    release_bundle = _optional(doc, "release_bundle", lambda d, n: _field(d, n, dict))
    return public_keys, workers, release_bundle


def _nvidia_collateral(collateral: dict[str, Any], device: int) -> tuple[list[bytes], list[bytes]]:
    """The RIMs and OCSP responses the document ships for `device` (self-authenticating, so not bound)."""
    for item in collateral.get("nvidia") or []:
        if isinstance(item, dict) and item.get("device") == device:
            rims = [_unb64(item, name) for name in ("driver_rim", "vbios_rim") if item.get(name) is not None]
            ocsp = item.get("ocsp") or []
            if not isinstance(ocsp, list):
                raise DocumentInvalid("collateral.nvidia ocsp must be a list")
            return rims, [_b64_value(r, "collateral.nvidia ocsp") for r in ocsp]
    return [], []


def _check_gpu(
    entries: list[Any], gpu_nonce: bytes, collateral: dict[str, Any], at: datetime | None, device_roots: tuple | None
) -> tuple[GpuClaims, ...]:
    """Every GPU entry must verify (NVIDIA's signature and chain, this document's GPU nonce, the
    shipped RIMs and OCSP responses); what it then claims is for `appraise` to judge."""
    claims = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("format") != FORMAT_NVIDIA:
            raise GpuEvidenceInvalid("GPU evidence entry is not of format 'nvidia-cc'")
        device = _field(entry, "device", int)
        cc_mode, ready = entry.get("cc_mode"), entry.get("ready")
        if not isinstance(cc_mode, (str, type(None))) or not isinstance(ready, (bool, type(None))):
            raise DocumentInvalid(f"GPU {device} cc_mode must be a string and ready a boolean")
        rims, ocsp = _nvidia_collateral(collateral, device)
        try:
            result = verify_gpu_report(
                _unb64(entry, "evidence"),
                _unb64(entry, "certificate"),
                nonce=gpu_nonce,
                rims=rims,
                ocsp_responses=ocsp,
                at=at,
                device_roots=device_roots,
            )
        except ParseError as exc:
            raise GpuEvidenceInvalid(f"GPU {device} evidence is unreadable: {exc}") from None
        if not result.valid:
            raise GpuEvidenceInvalid(f"GPU {device} evidence does not verify: {'; '.join(result.errors)}")
        claims.append(result.claims(device, cc_mode=cc_mode, ready=ready))
    return tuple(claims)


def _check_release(bundle: dict[str, Any] | None, trusted_root: Any) -> ReleaseClaims | None:
    """The served release bundle, verified offline (public and self-authenticating, so not bound
    into report_data: the release's reference values are what ties it to this evidence)."""
    if bundle is None:
        return None
    from .release import verify_release

    return verify_release(bundle, trusted_root=trusted_root)


def verify_evidence(
    doc: dict[str, Any],
    *,
    expected_nonce: bytes,
    at: datetime | None = None,
    trusted_roots: tuple | None = None,
    gpu_device_roots: tuple | None = None,
    tls_cert_sha256: bytes | None = None,
    local_collateral: LocalCollateral | None = None,
    check_release: bool = False,
    release_trusted_root: Any = None,
) -> VerifiedAttestation:
    """Check that the document is authentic: well-formed, bound to our nonce and its keys, evidence
    signed up to a pinned root (or the simulated one), bundled collateral signed and current at `at`.

    `tls_cert_sha256` is the SHA-256 of the certificate the TLS connection that fetched the
    document presented (None over plain HTTP): the document must bind exactly that one.
    `local_collateral`, the client's own, replaces the document's collateral vendor by vendor.

    `check_release`: the node's `release_bundle`, when it serves one, must verify under the
    Sigstore trusted root `release_trusted_root` (a path; None: Sigstore's public-good root);
    who signed it is appraised afterwards.

    Returns the document's contents with its claims (`verify_document` then appraises them).
    """
    if not isinstance(doc, dict) or type(doc.get("version")) is not int or doc["version"] not in DOCUMENT_VERSIONS:
        raise DocumentInvalid("not an attestation document of version 2 or 3")
    version = doc["version"]
    public_keys, workers, release_bundle = _v3_fields(doc) if version == 3 else (None, None, None)
    tee = _field(doc, "tee", str)
    if tee not in TEE_TYPES:
        raise DocumentInvalid(f"unknown TEE type {tee!r}")
    claims_simulated = _field(doc, "simulated", bool)

    nonce = _hex(doc, "nonce", binding.NONCE_SIZE)
    if not hmac.compare_digest(nonce, expected_nonce):
        raise NonceMismatch("the document answers a different nonce")
    dh_public_key = _unb64(doc, "dh_public_key", binding.KEY_SIZE)
    signing_public_key = _unb64(doc, "signing_public_key", binding.KEY_SIZE)
    key_epoch = _field(doc, "key_epoch", int)
    config_digest = _hex(doc, "config_digest", binding.DIGEST_SIZE)
    measured_config = _field(doc, "measured_config", dict)
    if not hmac.compare_digest(binding.config_digest(measured_config), config_digest):
        raise DocumentInvalid("document measured_config does not hash to its config_digest")
    kem_public_key = _optional(doc, "kem_public_key", lambda d, n: _unb64(d, n, binding.KEM_PUBLIC_KEY_SIZE))
    attested_tls = _optional(doc, "tls_cert_sha256", lambda d, n: _hex(d, n, binding.DIGEST_SIZE))
    if tls_cert_sha256 is not None and not (attested_tls and hmac.compare_digest(attested_tls, tls_cert_sha256)):
        raise TlsCertificateMismatch(
            f"the connection presented TLS certificate sha256 {tls_cert_sha256.hex()}, but the attestation "
            f"binds {attested_tls.hex() if attested_tls else 'no certificate'}: a man-in-the-middle or a TLS "
            "endpoint outside the TEE answered; nothing was sent to it"
        )
    collateral = _collateral(doc)
    gpu_entries = _field(doc, "gpu_evidence", list)
    try:
        expected_report_data = binding.report_data(
            nonce=expected_nonce,
            dh_public_key=dh_public_key,
            signing_public_key=signing_public_key,
            key_epoch=key_epoch,
            config_digest=config_digest,
            gpu_evidence=gpu_entries,
            kem_public_key=kem_public_key,
            tls_cert_sha256=attested_tls,
            version=version,
            public_keys=public_keys,
            workers=workers,
        )
    except (ValueError, TypeError):
        raise DocumentInvalid("document fields cannot be bound into report_data") from None
    if not hmac.compare_digest(_hex(doc, "report_data", binding.REPORT_DATA_SIZE), expected_report_data):
        raise ReportDataMismatch("document report_data does not commit to its keys, nonce and configuration")

    cpu = _field(doc, "cpu_evidence", dict)
    if cpu.get("format") != _TEE_FORMAT[tee]:
        raise DocumentInvalid(f"cpu_evidence format {cpu.get('format')!r} does not match TEE type {tee!r}")
    quote = _unb64(cpu, "quote")
    certificates = cpu.get("certificates")
    if certificates is not None and not isinstance(certificates, str):
        raise DocumentInvalid("cpu_evidence certificates must be PEM text or null")

    if cpu["format"] == FORMAT_TDX:
        intel = IntelCollateral.from_document(collateral["intel"]) if collateral["intel"] is not None else None
        if local_collateral is not None and local_collateral.intel is not None:
            intel = local_collateral.intel
        result = tdx.verify_quote(quote, at=at, trusted_roots=trusted_roots, collateral=intel)
        simulated, cpu_claims = result.simulated, result.claims
    else:
        certs = sevsnp.load_amd_certificates(certificates.encode()) if certificates else []
        amd = AmdCollateral.from_document(collateral["amd"]) if collateral["amd"] is not None else None
        if local_collateral is not None and local_collateral.amd is not None:
            amd = local_collateral.amd
        if amd is not None:
            certs += amd.certificates()
        snp = sevsnp.verify_report(quote, certs, at=at, trusted_roots=trusted_roots, crl=amd.crl if amd else None)
        simulated, cpu_claims = False, snp.claims
    if simulated != (tee == "simulated") or simulated != claims_simulated:
        raise DocumentInvalid("the document's tee/simulated claims do not match its evidence")
    if not hmac.compare_digest(cpu_claims.report_data, expected_report_data):
        raise ReportDataMismatch("the evidence's REPORTDATA does not commit to this document's keys and nonce")

    gpu_nonce = binding.gpu_nonce(nonce=expected_nonce, dh_public_key=dh_public_key, signing_public_key=signing_public_key)
    gpus = _check_gpu(gpu_entries, gpu_nonce, collateral, at, gpu_device_roots)
    release = _check_release(release_bundle, release_trusted_root) if check_release else None
    worker_attestations = _verify_workers(
        workers or [],
        at=at,
        trusted_roots=trusted_roots,
        gpu_device_roots=gpu_device_roots,
        local_collateral=local_collateral,
        check_release=check_release,
        release_trusted_root=release_trusted_root,
    )
    claims = Claims(
        tee=tee,
        simulated=simulated,
        cpu=cpu_claims,
        config_digest=config_digest,
        gpu_evidence=len(gpu_entries),
        gpus=gpus,
        kem_public_key=kem_public_key,
        release=release,
    )
    return VerifiedAttestation(
        tee=tee,
        simulated=simulated,
        dh_public_key=dh_public_key,
        signing_public_key=signing_public_key,
        key_epoch=key_epoch,
        config_digest=config_digest,
        measured_config=measured_config,
        kem_public_key=kem_public_key,
        tls_cert_sha256=attested_tls,
        collateral=collateral,
        claims=claims,
        version=version,
        public_keys=public_keys if public_keys is not None else binding.empty_public_keys(),
        workers=workers,
        release_bundle=release_bundle,
        worker_attestations=worker_attestations,
        gpu_devices=len(gpus),
        gpu_verified=bool(gpus),
        notes=(*cpu_claims.collateral_notes, *(note for gpu in gpus for note in gpu.notes)),
    )


def verify_document(
    doc: dict[str, Any],
    *,
    expected_nonce: bytes,
    policy: Policy,
    at: datetime | None = None,
    trusted_roots: tuple | None = None,
    gpu_device_roots: tuple | None = None,
    tls_cert_sha256: bytes | None = None,
) -> VerifiedAttestation:
    """Trust the document's keys only if its evidence is authentic (`verify_evidence`) and the
    policy accepts its claims (`appraise`); raises PolicyRefused naming every failing claim."""
    verified = verify_evidence(
        doc,
        expected_nonce=expected_nonce,
        at=at,
        trusted_roots=trusted_roots,
        gpu_device_roots=gpu_device_roots,
        tls_cert_sha256=tls_cert_sha256,
        local_collateral=policy.collateral,
        check_release=policy.release is not None,
        release_trusted_root=policy.release.trusted_root if policy.release is not None else None,
    )
    verdict = appraise(verified.claims, policy)
    errors, warnings = list(verdict.errors), list(verdict.warnings)
    workers = []
    # Every VM that touches the client's data answers to the same policy: one refusal refuses the node.
    for entry, worker in zip(verified.workers or [], verified.worker_attestations):
        worker_verdict = appraise(worker.claims, policy)
        errors += [f"worker {entry['role']}: {error}" for error in worker_verdict.errors]
        warnings += [f"worker {entry['role']}: {warning}" for warning in worker_verdict.warnings]
        workers.append(replace(worker, warnings=worker_verdict.warnings, claims=appraised_claims(worker.claims, worker_verdict)))
    if errors:
        raise PolicyRefused(errors)
    return replace(
        verified,
        warnings=tuple(warnings),
        claims=appraised_claims(verified.claims, verdict),
        worker_attestations=tuple(workers),
    )


def _verify_workers(
    entries: list[dict[str, Any]],
    *,
    at: datetime | None,
    trusted_roots: tuple | None,
    gpu_device_roots: tuple | None,
    local_collateral: LocalCollateral | None,
    check_release: bool,
    release_trusted_root: Any,
) -> tuple[VerifiedAttestation, ...]:
    """Each worker's own document, authentic and bound to its link key (attestation/workers.py);
    a worker lists no workers of its own. Appraisal is verify_document's."""
    verified = []
    for item in entries:
        entry = WorkerEntry.from_json(item)
        if entry.evidence.get("workers") is not None:
            raise DocumentInvalid(f"worker {entry.role}: a worker's evidence must not list workers of its own")
        try:
            worker = verify_evidence(
                entry.evidence,
                expected_nonce=entry.expected_nonce,
                at=at,
                trusted_roots=trusted_roots,
                gpu_device_roots=gpu_device_roots,
                local_collateral=local_collateral,
                # Each VM shows the release it runs; a policy with a [release] judges every one.
                check_release=check_release,
                release_trusted_root=release_trusted_root,
            )
        except NonceMismatch:
            raise NonceMismatch(f"worker {entry.role}: its evidence does not bind its link key and challenge") from None
        except AttestationError as exc:
            raise type(exc)(f"worker {entry.role}: {exc}") from None
        verified.append(worker)
    return tuple(verified)
