"""TDX and SEV-SNP evidence through Linux configfs-tsm (kernel 6.7+).

Methods block (file I/O); the server calls them in a worker thread.
"""

from __future__ import annotations

import os
import secrets
import struct
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from ..errors import AttestationError, AttestationUnavailable, ChainInvalid
from ..evidence import FORMAT_SNP, FORMAT_TDX, CpuEvidence, check_report_data
from ..sevsnp import load_amd_certificates

TSM_REPORT_PATH = Path("/sys/kernel/config/tsm/report")

# configfs-tsm `provider` attribute per TEE type.
_TSM_PROVIDER = {"tdx": "tdx_guest", "sev-snp": "sev_guest"}
_TSM_FORMAT = {"tdx": FORMAT_TDX, "sev-snp": FORMAT_SNP}

# SEV-SNP auxblob: the host's certificate table, entries of GUID(16) + offset u32 + length u32,
# ended by an all-zero entry; offsets count from the start of the table.
SNP_CERT_ENTRY_SIZE = 24
SNP_CERT_ENTRY_GUID_SIZE = 16


class TsmFilesystem:
    """The file operations TsmProvider needs; tests substitute a fake kernel."""

    def mkdir(self, path: Path) -> None:
        os.mkdir(path)

    def rmdir(self, path: Path) -> None:
        os.rmdir(path)

    def read(self, path: Path) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    def write(self, path: Path, data: bytes) -> None:
        # One write call: configfs binary attributes take the blob as written.
        with open(path, "wb", buffering=0) as fh:
            fh.write(data)


def snp_certificates_pem(auxblob: bytes) -> str | None:
    """PEM of every certificate in a SEV-SNP certificate table (VCEK/VLEK, ASK, ARK), or None if empty."""
    pems: list[bytes] = []
    for offset in range(0, len(auxblob) - SNP_CERT_ENTRY_SIZE + 1, SNP_CERT_ENTRY_SIZE):
        guid = auxblob[offset:offset + SNP_CERT_ENTRY_GUID_SIZE]
        start, length = struct.unpack_from("<II", auxblob, offset + SNP_CERT_ENTRY_GUID_SIZE)
        if not any(guid):
            break
        if start + length > len(auxblob):
            raise AttestationError("SEV-SNP certificate table entry points outside the auxblob")
        try:
            (cert,) = load_amd_certificates(auxblob[start:start + length])
        except ChainInvalid:
            continue  # the table may carry other blobs (e.g. CRLs); only certificates matter here
        pems.append(cert.public_bytes(Encoding.PEM))
    return b"".join(pems).decode() if pems else None


class TsmProvider:
    """TDX or SEV-SNP evidence through Linux configfs-tsm (kernel 6.7+)."""

    def __init__(
        self,
        tee: str,
        *,
        base_path: str | Path = TSM_REPORT_PATH,
        fs: TsmFilesystem | None = None,
        max_attempts: int = 3,
    ):
        if tee not in _TSM_PROVIDER:
            raise ValueError(f"unknown TEE type {tee!r} (expected 'tdx' or 'sev-snp')")
        self.tee = tee
        self._base = Path(base_path)
        self._fs = fs or TsmFilesystem()
        self._max_attempts = max_attempts
        if not self._base.is_dir():
            raise AttestationUnavailable(f"configfs-tsm report interface not found at {self._base} (is this a {tee} guest?)")
        # Fail at start-up, not at the first client request, when the interface belongs to another TEE.
        with self._report_dir() as path:
            self._check_provider(path)

    def _check_provider(self, path: Path) -> None:
        expected = _TSM_PROVIDER[self.tee]
        try:
            provider = self._fs.read(path / "provider").decode(errors="replace").strip()
        except OSError:
            raise AttestationUnavailable("configfs-tsm report has no provider attribute") from None
        if provider != expected:
            raise AttestationUnavailable(f"configfs-tsm provider is {provider!r}, expected {expected!r}")

    def _generation(self, path: Path) -> int:
        try:
            return int(self._fs.read(path / "generation").strip())
        except (OSError, ValueError):
            raise AttestationUnavailable("configfs-tsm generation attribute is unreadable") from None

    def _report_dir(self) -> "_ReportDir":
        return _ReportDir(self._fs, self._base / f"tee-node-{os.getpid()}-{secrets.token_hex(8)}")

    def get_evidence(self, report_data: bytes) -> CpuEvidence:
        check_report_data(report_data)
        for _ in range(self._max_attempts):
            with self._report_dir() as path:
                self._check_provider(path)
                before = self._generation(path)
                try:
                    self._fs.write(path / "inblob", report_data)
                    quote = self._fs.read(path / "outblob")
                    auxblob = self._read_optional(path / "auxblob")
                except OSError as exc:
                    raise AttestationUnavailable(f"configfs-tsm refused the report request ({exc.strerror or exc})") from None
                # Exactly our one write must have happened; anything else means another writer
                # touched this report and the outblob may answer someone else's inblob.
                if self._generation(path) != before + 1:
                    continue
            if not quote:
                raise AttestationUnavailable("configfs-tsm returned an empty report")
            certificates = snp_certificates_pem(auxblob) if self.tee == "sev-snp" else None
            return CpuEvidence(tee=self.tee, format=_TSM_FORMAT[self.tee], quote=quote, certificates=certificates, simulated=False)
        raise AttestationUnavailable(f"configfs-tsm report changed under a concurrent writer {self._max_attempts} times")

    def _read_optional(self, path: Path) -> bytes:
        try:
            return self._fs.read(path)
        except FileNotFoundError:
            return b""


class _ReportDir:
    """A fresh report directory per request, removed afterwards whatever happens."""

    def __init__(self, fs: TsmFilesystem, path: Path):
        self._fs, self.path = fs, path

    def __enter__(self) -> Path:
        try:
            self._fs.mkdir(self.path)
        except OSError as exc:
            raise AttestationUnavailable(f"cannot create a configfs-tsm report ({exc.strerror or exc})") from None
        return self.path

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._fs.rmdir(self.path)
        except OSError:
            pass  # a leftover report directory is harmless and must not hide the real outcome
