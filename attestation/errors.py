"""One exception hierarchy for everything that can go wrong with attestation evidence."""


class AttestationError(Exception):
    """Base class: the evidence cannot be trusted (or cannot be produced)."""


class ParseError(AttestationError):
    """The bytes are not a well-formed quote/report (truncated, bad value, unsupported type)."""


class SignatureInvalid(AttestationError):
    """A signature in the evidence or its certificate chain does not verify."""


class ChainInvalid(AttestationError):
    """A certificate chain is malformed, expired at the verification time or not rooted in a pinned root."""


class CertificateRevoked(ChainInvalid):
    """A certificate of the chain is listed in a CRL."""


class CollateralInvalid(AttestationError):
    """Supplied vendor collateral (CRL, TCB info, QE identity) is malformed, stale or does not match."""


class DocumentInvalid(AttestationError):
    """The attestation document is not well-formed (missing field, wrong type, bad encoding or length)."""


class ReportDataMismatch(AttestationError):
    """REPORTDATA does not commit to the document's keys, nonce and configuration."""


class NonceMismatch(AttestationError):
    """The evidence answers a different nonce than the one the verifier sent."""


class PolicyRefused(AttestationError):
    """The evidence is authentic but the policy does not accept it; `errors` names each failing claim."""

    def __init__(self, errors: tuple[str, ...] | list[str]):
        self.errors = tuple(errors)
        super().__init__("; ".join(self.errors))


class GpuEvidenceInvalid(AttestationError):
    """GPU evidence is missing, malformed, bound to another nonce, or could not be verified while required."""


class AttestationUnavailable(AttestationError):
    """The TEE or GPU attestation device is missing or refused to produce evidence."""


class TlsCertificateMismatch(AttestationError):
    """The TLS certificate the connection presented is not the one the attestation binds."""


class OhttpKeyMismatch(AttestationError):
    """The Oblivious HTTP key configuration a request went to is not one the attestation binds."""


class ReleaseInvalid(AttestationError):
    """A release bundle does not verify (signature, certificate chain, SCT, log proofs) or does not carry a tee-node release."""
