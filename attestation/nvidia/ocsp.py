"""OCSP responses for NVIDIA certificate chains (device identity and RIM signing), checked offline
at a given time: signed by the issuer or its delegated responder, status good, current.

Which certificates need a status: in a GPU attestation chain every certificate between the leaf and
the root (the leaf is made by the GPU firmware at each boot and has no OCSP record); in a RIM chain
every certificate but the root (nvtrust checks the same ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from .. import trust
from ..claims import OCSP_GOOD, OCSP_UNKNOWN
from ..errors import CertificateRevoked, ChainInvalid, CollateralInvalid, SignatureInvalid


@dataclass(frozen=True)
class OcspSubject:
    """A certificate whose revocation status is needed, with the CA that issued it."""

    cert: x509.Certificate
    issuer: x509.Certificate


@dataclass(frozen=True)
class OcspResult:
    status: str  # OCSP_GOOD or OCSP_UNKNOWN
    checked: tuple[str, ...]  # common names with a good response
    missing: tuple[str, ...]  # common names without a current response
    stale: tuple[str, ...] = ()  # of those, the ones whose response is out of date or undated


def device_chain_subjects(chain: Sequence[x509.Certificate]) -> list[OcspSubject]:
    return [OcspSubject(chain[i], chain[i + 1]) for i in range(1, len(chain) - 1)]


def rim_chain_subjects(chain: Sequence[x509.Certificate]) -> list[OcspSubject]:
    return [OcspSubject(chain[i], chain[i + 1]) for i in range(len(chain) - 1)]


def gpu_subjects(
    device_chain: Sequence[x509.Certificate], rim_signing_chains: Sequence[Sequence[x509.Certificate]]
) -> list[OcspSubject]:
    """Every certificate of a GPU whose revocation status a verifier needs."""
    subjects = device_chain_subjects(device_chain)
    for chain in rim_signing_chains:
        subjects += rim_chain_subjects(chain)
    return subjects


def load_responses(responses: Sequence[bytes]) -> list[ocsp.OCSPResponse]:
    loaded = []
    for der in responses:
        try:
            response = ocsp.load_der_ocsp_response(der)
        except ValueError as exc:
            raise CollateralInvalid(f"OCSP response is malformed: {exc}") from None
        if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
            raise CollateralInvalid(f"OCSP response status is {response.response_status.name}, not SUCCESSFUL")
        loaded.append(response)
    return loaded


def _matches(single: ocsp.OCSPSingleResponse, subject: OcspSubject) -> bool:
    if single.serial_number != subject.cert.serial_number:
        return False
    # The CertID hashes are defined by OCSP; let the library compute ours with the response's algorithm.
    request = ocsp.OCSPRequestBuilder().add_certificate(subject.cert, subject.issuer, single.hash_algorithm).build()
    return request.issuer_name_hash == single.issuer_name_hash and request.issuer_key_hash == single.issuer_key_hash


def _signature_verifies(key: object, response: ocsp.OCSPResponse) -> bool:
    algorithm = response.signature_hash_algorithm
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, TypeError):
        return False
    return True


def _is_delegated_responder(cert: x509.Certificate, issuer: x509.Certificate, at: datetime) -> bool:
    """RFC 6960 4.2.2.2: issued directly by the CA, for OCSP signing, valid now."""
    try:
        trust.verify_issued_by(cert, issuer)
        trust.check_validity(cert, at)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (ChainInvalid, SignatureInvalid, x509.ExtensionNotFound):
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in usages


def _check_signed_by_issuer(response: ocsp.OCSPResponse, subject: OcspSubject, at: datetime) -> None:
    if _signature_verifies(subject.issuer.public_key(), response):
        return
    for responder in response.certificates:
        if _is_delegated_responder(responder, subject.issuer, at) and _signature_verifies(responder.public_key(), response):
            return
    raise CollateralInvalid(
        f"OCSP response for {trust.common_name(subject.cert)!r} is not signed by {trust.common_name(subject.issuer)!r} "
        "or a responder it delegated to"
    )


def _is_current(single: ocsp.OCSPSingleResponse, at: datetime) -> bool:
    """A response without next_update cannot be judged fresh, so it counts as none."""
    next_update = single.next_update_utc
    return next_update is not None and single.this_update_utc <= at <= next_update


def _check_status(single: ocsp.OCSPSingleResponse, subject: OcspSubject) -> None:
    name = trust.common_name(subject.cert)
    if single.certificate_status == ocsp.OCSPCertStatus.REVOKED:
        reason = single.revocation_reason.name if single.revocation_reason else "no reason given"
        raise CertificateRevoked(f"certificate {name!r} is revoked ({reason}) according to its OCSP response")
    if single.certificate_status != ocsp.OCSPCertStatus.GOOD:
        raise CollateralInvalid(f"OCSP responder does not know certificate {name!r}")


def check_ocsp(subjects: Sequence[OcspSubject], responses: Sequence[ocsp.OCSPResponse], at: datetime) -> OcspResult:
    """Every response that answers for a subject must be signed by its issuer; a current one must say good.

    A subject with no current response is `unknown` (a stale response is as good as none: fetch a
    fresh one). Responses for other certificates are ignored (a node may ship one list for several chains).
    """
    at = trust.as_utc(at)
    checked: list[str] = []
    missing: list[str] = []
    stale: list[str] = []
    for subject in subjects:
        name = trust.common_name(subject.cert)
        current = answered = False
        for response in responses:
            for single in response.responses:
                if _matches(single, subject):
                    _check_signed_by_issuer(response, subject, at)
                    answered = True
                    if _is_current(single, at):
                        _check_status(single, subject)
                        current = True
        (checked if current else missing).append(name)
        if answered and not current:
            stale.append(name)
    return OcspResult(
        status=OCSP_UNKNOWN if missing or not subjects else OCSP_GOOD,
        checked=tuple(checked),
        missing=tuple(missing),
        stale=tuple(stale),
    )
