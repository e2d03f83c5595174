"""Releases: the signed statement that ties a node's reference values to a source release.

A release is an in-toto Statement v1 whose predicate (`urn:tee-node:release:v1`) names the
version, the source (repository and commit) and the `reference_values` a node built from it
reports, in the keys of a policy file (docs/policy.md). The release pipeline signs it as a DSSE
envelope with keyless Sigstore signing and logs it in Rekor (docs/releases.md); the Sigstore
bundle is what a node serves and a client checks.

Verification is sigstore-python's, offline, against a trusted root (Sigstore's public-good root
shipped in `attestation/roots/` unless another is named): the certificate chain at the log's
integration time, the SCT, the inclusion proof to a signed checkpoint, the signed entry
timestamp, the DSSE signature and the log entry's consistency with the envelope. This module
adds only what is ours: the statement's shape and predicate type. Which signer to trust is a
policy decision (`appraisal.appraise`, `[release]`), made with the identity policies built here.

No I/O beyond reading a trusted root file.
"""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .appraisal import (
    REFERENCE_GPU_KEYS,
    REFERENCE_SNP_KEYS,
    REFERENCE_TDX_KEYS,
    REFERENCE_TOP_KEYS,
    PolicyError,
    ReferenceValues,
    policy_from_claims,
)
from .claims import Claims, ReleaseClaims
from .errors import ReleaseInvalid

if TYPE_CHECKING:  # sigstore is imported when a bundle is checked: it costs ~0.2 s
    from cryptography.x509 import Certificate
    from sigstore.models import Bundle, TrustedRoot
    from sigstore.verify.policy import VerificationPolicy

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "urn:tee-node:release:v1"
IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
DEFAULT_TRUSTED_ROOT = "sigstore_public_good_trusted_root.json"  # in attestation/roots/
# Fulcio's certificate extensions (github.com/sigstore/fulcio, docs/oid-info.md).
_OIDC_ISSUER_V1 = "1.3.6.1.4.1.57264.1.1"
_OIDC_ISSUER_V2 = "1.3.6.1.4.1.57264.1.8"
_SAN_OTHERNAME = "1.3.6.1.4.1.57264.1.7"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


# --- the statement ----------------------------------------------------------------------


def reference_values_from_claims(claims: Claims) -> dict[str, Any]:
    """The reference values of known-good evidence: what `tee-node policy from-quote` pins,
    minus the client's own choices (TCB statuses, debug, simulated)."""
    policy = tomllib.loads(policy_from_claims(claims))
    tables = {"tdx": REFERENCE_TDX_KEYS, "sev_snp": REFERENCE_SNP_KEYS, "gpu": REFERENCE_GPU_KEYS}
    values = {
        key: {k: v for k, v in value.items() if k in tables[key]} if key in tables else value
        for key, value in policy.items()
        if key in REFERENCE_TOP_KEYS
    }
    ReferenceValues.from_mapping(values, "the statement")  # what we write must read back
    return values


def build_statement(
    reference_values: Mapping[str, Any],
    *,
    version: str,
    repository: str,
    commit: str,
    subjects: Mapping[str, str],
) -> dict[str, Any]:
    """The unsigned in-toto statement of a release; `subjects` maps image names to SHA-256 hex."""
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": digest.lower()}} for name, digest in subjects.items()],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "version": version,
            "source": {"repository": repository, "commit": commit.lower()},
            "reference_values": dict(reference_values),
        },
    }
    _check_statement(statement)
    return statement


def _check_statement(statement: Any) -> dict[str, Any]:
    """The predicate of a tee-node release statement; ReleaseInvalid says what is wrong."""
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise ReleaseInvalid(f"the signed payload is not an in-toto Statement v1 ({STATEMENT_TYPE})")
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise ReleaseInvalid(
            f"the signed statement has predicateType {statement.get('predicateType')!r}, not {PREDICATE_TYPE!r}: it is not a tee-node release"
        )
    subjects = statement.get("subject")
    if not isinstance(subjects, list) or not subjects:
        raise ReleaseInvalid("the release statement names no subject (the image it releases)")
    for subject in subjects:
        digest = subject.get("digest") if isinstance(subject, dict) else None
        if not isinstance(digest, dict) or not isinstance(subject.get("name"), str) or not _SHA256.match(str(digest.get("sha256", ""))):
            raise ReleaseInvalid("each subject of a release needs a name and a sha256 digest (64 lowercase hex)")
    predicate = statement.get("predicate")
    if not isinstance(predicate, dict):
        raise ReleaseInvalid("the release statement has no predicate object")
    unknown = sorted(set(predicate) - {"version", "source", "reference_values"})
    if unknown:
        raise ReleaseInvalid(f"unknown key(s) in the release predicate: {', '.join(unknown)}")
    if not isinstance(predicate.get("version"), str) or not predicate["version"]:
        raise ReleaseInvalid("the release predicate has no version")
    source = predicate.get("source")
    if (
        not isinstance(source, dict)
        or set(source) != {"repository", "commit"}
        or not isinstance(source["repository"], str)
        or not _COMMIT.match(str(source["commit"]))
    ):
        raise ReleaseInvalid("the release predicate's source must be {repository, commit (40 lowercase hex)}")
    try:
        ReferenceValues.from_mapping(predicate.get("reference_values"), f"release {predicate['version']}")
    except PolicyError as exc:
        raise ReleaseInvalid(f"the release's reference_values are not pins a policy accepts: {exc}") from None
    return predicate


# --- bundles and trusted roots ----------------------------------------------------------


def parse_bundle(data: bytes | str | Mapping[str, Any]) -> Bundle:
    """A Sigstore bundle (JSON text or the parsed object); ReleaseInvalid when it is not one."""
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import Bundle

    try:
        text = json.dumps(data) if isinstance(data, Mapping) else data
        return Bundle.from_json(text)
    except (SigstoreError, ValueError, TypeError, KeyError) as exc:  # pydantic's ValidationError is a ValueError
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ReleaseInvalid(f"not a Sigstore bundle: {reason}") from None


def load_trusted_root(path: str | Path | None = None) -> TrustedRoot:
    """A Sigstore trusted root JSON file; Sigstore's public-good root (shipped) when None."""
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import TrustedRoot

    try:
        if path is None:
            with resources.as_file(resources.files(__package__).joinpath("roots", DEFAULT_TRUSTED_ROOT)) as shipped:
                return TrustedRoot.from_file(str(shipped))
        return TrustedRoot.from_file(str(path))
    except OSError as exc:
        raise ReleaseInvalid(f"cannot read the Sigstore trusted root {path}: {exc.strerror}") from None
    except (SigstoreError, ValueError) as exc:
        raise ReleaseInvalid(f"{path} is not a Sigstore trusted root: {str(exc).splitlines()[0]}") from None


# --- who signed ---------------------------------------------------------------------------


def certificate_identities(certificate: Certificate) -> tuple[str, ...]:
    """The SANs Fulcio puts the OIDC identity in (email, URI, Sigstore's other name), as sigstore's `Identity` reads them."""
    from cryptography.x509 import ExtensionNotFound, OtherName, RFC822Name, SubjectAlternativeName, UniformResourceIdentifier

    try:
        san = certificate.extensions.get_extension_for_class(SubjectAlternativeName).value
    except ExtensionNotFound:
        return ()
    others = [o.value.decode(errors="replace") for o in san.get_values_for_type(OtherName) if o.type_id.dotted_string == _SAN_OTHERNAME]
    return (*san.get_values_for_type(RFC822Name), *san.get_values_for_type(UniformResourceIdentifier), *others)


def certificate_issuer(certificate: Certificate) -> str | None:
    """The OIDC issuer Fulcio recorded (its v1 extension, raw; else the v2 one, a DER UTF8String)."""
    from cryptography.hazmat import asn1
    from cryptography.x509 import ExtensionNotFound, ObjectIdentifier

    for oid in (_OIDC_ISSUER_V1, _OIDC_ISSUER_V2):
        try:
            raw = certificate.extensions.get_extension_for_oid(ObjectIdentifier(oid)).value.value
        except ExtensionNotFound:
            continue
        try:
            return raw.decode() if oid == _OIDC_ISSUER_V1 else asn1.decode_der(str, raw)
        except ValueError:
            return None
    return None


class _IdentityPattern:
    """sigstore `VerificationPolicy`: one of the certificate's SANs matches `pattern` in full
    (sigstore-python's `Identity` takes exact identities only)."""

    def __init__(self, pattern: str) -> None:
        self._pattern = re.compile(pattern)

    def verify(self, certificate: Certificate) -> None:
        from sigstore.errors import VerificationError

        identities = certificate_identities(certificate)
        if not any(self._pattern.fullmatch(identity) for identity in identities):
            raise VerificationError(
                f"Certificate's SANs do not match the pattern {self._pattern.pattern!r}; actual SANs: {list(identities)}"
            )


def identity_policy(*, issuer: str, identity: str | None = None, identity_pattern: str | None = None) -> VerificationPolicy:
    """The signer a client expects: an exact identity or a regular expression matched in full,
    and the OIDC issuer (sigstore-python's `Identity` and `OIDCIssuer` policies)."""
    from sigstore.verify import policy

    if (identity is None) == (identity_pattern is None):
        raise ValueError("give exactly one of identity and identity_pattern")
    if identity is not None:
        return policy.Identity(identity=identity, issuer=issuer)
    return policy.AllOf([policy.OIDCIssuer(issuer), _IdentityPattern(identity_pattern)])


def signer_mismatch(release: ReleaseClaims, expected: VerificationPolicy) -> str | None:
    """Why `expected` refuses the release's signing certificate (None: it accepts it)."""
    from sigstore.errors import VerificationError

    try:
        expected.verify(release.certificate)
    except VerificationError as exc:
        return str(exc)
    return None


class _AnySigner:
    """sigstore `VerificationPolicy` that accepts every signer: the evidence step checks only that
    the bundle is authentic; the identity and issuer are appraised afterwards (`signer_mismatch`).
    (sigstore's own `UnsafeNoOp` would log a warning on every document.)"""

    def verify(self, certificate: Certificate) -> None:
        return None


# --- verification -----------------------------------------------------------------------


def verify_release(
    bundle: bytes | str | Mapping[str, Any],
    *,
    trusted_root: str | Path | TrustedRoot | None = None,
    signer: VerificationPolicy | None = None,
) -> ReleaseClaims:
    """Verify a release bundle offline and return its release.

    sigstore-python checks everything Sigstore signs (chain to the root's Fulcio CA at the
    log's time, SCT, Merkle inclusion proof, signed checkpoint, SET, DSSE signature, the log
    entry's consistency with the envelope) and, with `signer` (`identity_policy`), who signed;
    then the payload must be our statement. Raises ReleaseInvalid naming what failed.
    """
    from sigstore.dsse import Statement
    from sigstore.errors import Error as SigstoreError
    from sigstore.models import TrustedRoot
    from sigstore.verify import Verifier

    parsed = parse_bundle(bundle)
    root = trusted_root if isinstance(trusted_root, TrustedRoot) else load_trusted_root(trusted_root)
    try:
        payload_type, payload = Verifier(trusted_root=root).verify_dsse(parsed, signer or _AnySigner())
    except SigstoreError as exc:
        raise ReleaseInvalid(f"the release bundle does not verify: {exc}") from None
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise ReleaseInvalid(f"the release bundle signs a {payload_type!r} payload, not an in-toto statement")
    try:
        Statement(payload)  # sigstore's in-toto Statement v1 model: _type, subjects and their digests
    except SigstoreError as exc:
        raise ReleaseInvalid(f"the release bundle's payload is not an in-toto statement: {str(exc).splitlines()[0]}") from None
    predicate = _check_statement(json.loads(payload))
    entry = json.loads(parsed.to_json())["verificationMaterial"]["tlogEntries"][0]  # exactly one: sigstore requires it
    certificate = parsed.signing_certificate
    return ReleaseClaims(
        version=predicate["version"],
        source=predicate["source"],
        identities=certificate_identities(certificate),
        issuer=certificate_issuer(certificate),
        log_index=int(entry["logIndex"]),
        integrated_time=int(entry["integratedTime"]) if entry.get("integratedTime") else None,
        predicate=predicate,
        certificate=certificate,
    )
