"""NVIDIA reference integrity manifests (RIMs): signed SWID tags (ISO 19770-2) holding the golden
measurements of a driver or a VBIOS. The XML signature is checked with signxml; its certificate chain
(in the signature's KeyInfo) must end in the pinned NVIDIA RIM root at the verification time.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from datetime import datetime
from typing import Sequence

from cryptography import x509
from lxml import etree
from signxml import DigestAlgorithm, SignatureConfiguration, SignatureMethod, XMLVerifier
from signxml.exceptions import InvalidInput, SignXMLException

from .. import trust
from ..errors import ParseError, SignatureInvalid

SWID_NS = "http://standards.iso.org/iso/19770/-2/2015/schema.xsd"
XMLDSIG_NS = "http://www.w3.org/2000/09/xmldsig#"
SHA384_NS = "http://www.w3.org/2001/04/xmlenc#sha384"
MEASUREMENT_SIZE = 48  # SHA-384
MAX_RIM_BYTES = 1 << 20  # real RIMs are ~20 KiB

# NVIDIA signs RIMs with ECDSA P-384 over SHA-384 digests; nothing weaker is accepted.
_SIGNATURE_CONFIG = dict(
    signature_methods=frozenset({SignatureMethod.ECDSA_SHA384}),
    digest_algorithms=frozenset({DigestAlgorithm.SHA384}),
)


@dataclass(frozen=True)
class GoldenMeasurement:
    index: int  # the RIM's index: SPDM measurement block index - 1
    name: str
    size: int
    active: bool
    alternatives: tuple[bytes, ...]


@dataclass(frozen=True)
class ReferenceManifest:
    version: str  # Meta colloquialVersion: driver version ("545.00") or VBIOS version ("96.00.5E.00.01")
    product: str  # Meta product, e.g. "GH100"
    measurements: dict[int, GoldenMeasurement]
    signing_chain: tuple[x509.Certificate, ...]  # leaf first, ending at the RIM root

    @property
    def active(self) -> list[GoldenMeasurement]:
        return [m for m in self.measurements.values() if m.active]


def _parser() -> etree.XMLParser:
    # No entities, no DTD, no network: a RIM is data from the host, not to be trusted before its signature.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False, remove_comments=False)


def _signing_chain(root: etree._Element) -> tuple[x509.Certificate, ...]:
    # One enveloped signature, a child of the root: what signxml checks is then the one we read.
    signatures = list(root.iter(f"{{{XMLDSIG_NS}}}Signature"))
    if len(signatures) != 1 or signatures[0].getparent() is not root:
        raise ParseError("a RIM must carry exactly one XML signature, enveloped in its SoftwareIdentity")
    elements = signatures[0].findall(f"{{{XMLDSIG_NS}}}KeyInfo/{{{XMLDSIG_NS}}}X509Data/{{{XMLDSIG_NS}}}X509Certificate")
    if not elements:
        raise ParseError("RIM signature carries no X509Certificate")
    try:
        return tuple(x509.load_der_x509_certificate(base64.b64decode("".join((e.text or "").split()), validate=True)) for e in elements)
    except (binascii.Error, ValueError):
        raise ParseError("RIM signature carries a malformed certificate") from None


def _flag(value: str | None, what: str) -> bool:
    if value in ("True", "true"):
        return True
    if value in ("False", "false"):
        return False
    raise ParseError(f"RIM {what} is {value!r}, expected True or False")


def _int(element: etree._Element, name: str) -> int:
    try:
        return int(element.get(name, ""))
    except ValueError:
        raise ParseError(f"RIM Resource attribute {name!r} is missing or not an integer") from None


def _measurements(signed: etree._Element) -> dict[int, GoldenMeasurement]:
    payload = signed.find(f"{{{SWID_NS}}}Payload")
    if payload is None:
        raise ParseError("RIM has no Payload")
    out: dict[int, GoldenMeasurement] = {}
    for resource in payload.findall(f"{{{SWID_NS}}}Resource"):
        index, size, count = _int(resource, "index"), _int(resource, "size"), _int(resource, "alternatives")
        if size != MEASUREMENT_SIZE:
            raise ParseError(f"RIM measurement {index} is {size} bytes, expected {MEASUREMENT_SIZE} (SHA-384)")
        values = []
        for n in range(count):
            text = resource.get(f"{{{SHA384_NS}}}Hash{n}")
            try:
                value = bytes.fromhex(text or "")
            except ValueError:
                value = b""
            if len(value) != size:
                raise ParseError(f"RIM measurement {index} alternative {n} is missing or not {size} bytes of hex")
            values.append(value)
        if index in out:
            raise ParseError(f"RIM lists measurement {index} twice")
        out[index] = GoldenMeasurement(
            index=index,
            name=resource.get("name", ""),
            size=size,
            active=_flag(resource.get("active"), f"measurement {index} 'active'"),
            alternatives=tuple(values),
        )
    if not out:
        raise ParseError("RIM has no measurements")
    return out


def verify_rim(
    data: bytes,
    *,
    at: datetime | None = None,
    trusted_roots: Sequence[x509.Certificate] | None = None,
) -> ReferenceManifest:
    """Check the RIM's XML signature and its chain to the NVIDIA RIM root; read only what was signed."""
    if len(data) > MAX_RIM_BYTES:
        raise ParseError(f"RIM is {len(data)} bytes, more than {MAX_RIM_BYTES}")
    at = trust.as_utc(at)
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        raise ParseError(f"RIM is not well-formed XML: {exc}") from None
    chain = _signing_chain(root)
    trust.check_root(
        trust.verify_chain(chain, at), trust.nvidia_rim_roots() if trusted_roots is None else trusted_roots, simulated_ok=False
    )
    config = SignatureConfiguration(verification_time=at, **_SIGNATURE_CONFIG)
    try:
        # The leaf was just checked to chain to the pinned root; signxml checks the signature with it.
        result = XMLVerifier().verify(root, x509_cert=chain[0], expect_config=config)
    except InvalidInput as exc:
        raise ParseError(f"RIM signature is malformed: {exc}") from None
    except SignXMLException as exc:
        raise SignatureInvalid(f"RIM XML signature does not verify: {exc}") from None
    signed = result.signed_xml
    if signed is None or signed.tag != f"{{{SWID_NS}}}SoftwareIdentity":
        raise SignatureInvalid("the RIM's signature does not cover its SoftwareIdentity")
    meta = signed.find(f"{{{SWID_NS}}}Meta")
    version = meta.get("colloquialVersion") if meta is not None else None
    if not version:
        raise ParseError("RIM Meta has no colloquialVersion")
    return ReferenceManifest(
        version=version,
        product=meta.get("product", ""),
        measurements=_measurements(signed),
        signing_chain=chain,
    )
