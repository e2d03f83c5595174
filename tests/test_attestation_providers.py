"""configfs-tsm against a fake kernel in tmp_path, NVML through a fake module, the simulated provider."""

import base64
import hashlib
import struct
import uuid
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from attestation import sevsnp, tdx
from attestation.errors import AttestationUnavailable
from attestation.producers.nvml import NvidiaGpuProvider
from attestation.producers.simulated import SEED_FILE, SimulatedProvider, SimulatedTdx
from attestation.producers.tsm import TsmFilesystem, TsmProvider, snp_certificates_pem

TESTDATA = Path(__file__).resolve().parent / "data"
SEED = b"providers-test-seed-0123456789ab"


class FakeKernel(TsmFilesystem):
    """Plays configfs-tsm on a real directory: mkdir populates attributes, writing inblob produces outblob."""

    def __init__(self, provider="tdx_guest", make_outblob=None, auxblob=b"", races=0, with_provider=True):
        self.provider = provider
        self.make_outblob = make_outblob or (lambda inblob: b"QUOTE:" + inblob)
        self.auxblob = auxblob
        self.races = races  # how many requests see a concurrent writer
        self.with_provider = with_provider
        self.inblobs = []
        self.created = []

    def mkdir(self, path):
        super().mkdir(path)
        self.created.append(path)
        if self.with_provider:
            (path / "provider").write_text(self.provider + "\n")
        (path / "generation").write_text("0\n")
        (path / "outblob").write_bytes(b"")
        (path / "auxblob").write_bytes(self.auxblob)

    def write(self, path, data):
        assert path.name == "inblob"
        self.inblobs.append(data)
        generation = int((path.parent / "generation").read_text()) + 1
        if self.races:
            self.races -= 1
            generation += 1  # someone else wrote inblob too
        super().write(path, data)
        (path.parent / "generation").write_text(f"{generation}\n")
        (path.parent / "outblob").write_bytes(self.make_outblob(data))

    def rmdir(self, path):
        for child in path.iterdir():
            child.unlink()
        super().rmdir(path)


def test_tdx_report_through_configfs(tmp_path):
    kernel = FakeKernel()
    provider = TsmProvider("tdx", base_path=tmp_path, fs=kernel)
    report_data = bytes(range(64))
    evidence = provider.get_evidence(report_data)
    assert evidence.quote == b"QUOTE:" + report_data
    assert (evidence.tee, evidence.format, evidence.simulated, evidence.certificates) == ("tdx", "tdx-quote", False, None)
    assert kernel.inblobs == [report_data]  # exactly the 64 bytes, once
    assert len(set(kernel.created)) == 2  # start-up probe + one fresh directory per request
    assert list(tmp_path.iterdir()) == []  # every report directory was removed


def test_a_real_quote_layout_round_trips_through_configfs(tmp_path):
    sim = SimulatedTdx.from_seed(SEED)
    kernel = FakeKernel(make_outblob=lambda inblob: sim.quote(inblob, b"measured"))
    evidence = TsmProvider("tdx", base_path=tmp_path, fs=kernel).get_evidence(b"\x07" * 64)
    result = tdx.verify_quote(evidence.quote)
    assert result.quote.body.report_data == b"\x07" * 64


def test_a_concurrent_writer_is_detected_and_retried(tmp_path):
    kernel = FakeKernel(races=2)
    provider = TsmProvider("tdx", base_path=tmp_path, fs=kernel, max_attempts=3)
    assert provider.get_evidence(bytes(64)) == provider.get_evidence(bytes(64))  # second call has no race
    assert len(kernel.inblobs) == 4  # 2 raced attempts + 1 good, then 1 good
    assert list(tmp_path.iterdir()) == []


def test_a_persistent_concurrent_writer_fails(tmp_path):
    kernel = FakeKernel(races=10)
    provider = TsmProvider("tdx", base_path=tmp_path, fs=kernel, max_attempts=3)
    with pytest.raises(AttestationUnavailable, match="concurrent writer 3 times"):
        provider.get_evidence(bytes(64))
    assert len(kernel.inblobs) == 3
    assert list(tmp_path.iterdir()) == []


def test_wrong_provider_refuses_to_start(tmp_path):
    with pytest.raises(AttestationUnavailable, match="'sev_guest', expected 'tdx_guest'"):
        TsmProvider("tdx", base_path=tmp_path, fs=FakeKernel(provider="sev_guest"))
    with pytest.raises(AttestationUnavailable, match="no provider"):
        TsmProvider("sev-snp", base_path=tmp_path, fs=FakeKernel(with_provider=False))
    assert list(tmp_path.iterdir()) == []


def test_missing_configfs_refuses_to_start(tmp_path):
    with pytest.raises(AttestationUnavailable, match="not found"):
        TsmProvider("tdx", base_path=tmp_path / "absent")
    with pytest.raises(ValueError):
        TsmProvider("sgx", base_path=tmp_path)


def test_inblob_must_be_64_bytes(tmp_path):
    provider = TsmProvider("tdx", base_path=tmp_path, fs=FakeKernel())
    with pytest.raises(ValueError, match="64"):
        provider.get_evidence(bytes(32))


def _cert_table(ders):
    guids = ["63da758d-e664-4564-adc5-f4b93be8accd", "4ab7b379-bbac-4fe4-a02f-05aef327c782", "c0b406a4-a803-4952-9743-3fb6014cd0ae"]
    offset = 24 * (len(ders) + 1)
    table, blobs = b"", b""
    for guid, der in zip(guids, ders):
        table += uuid.UUID(guid).bytes_le + struct.pack("<II", offset + len(blobs), len(der))
        blobs += der
    return table + bytes(24) + blobs


def test_sev_snp_report_and_certificate_table_through_configfs(tmp_path):
    certs = sevsnp.load_amd_certificates((TESTDATA / "sev-snp" / "vcek.testcer").read_bytes())
    certs += sevsnp.load_amd_certificates((TESTDATA / "sev-snp" / "milan.testcer").read_bytes())
    report = (TESTDATA / "sev-snp" / "attestation.bin").read_bytes()
    kernel = FakeKernel(
        provider="sev_guest",
        make_outblob=lambda inblob: report,
        auxblob=_cert_table([c.public_bytes(Encoding.DER) for c in certs]),
    )
    evidence = TsmProvider("sev-snp", base_path=tmp_path, fs=kernel).get_evidence(bytes(64))
    assert (evidence.tee, evidence.format) == ("sev-snp", "sev-snp-report")
    chain = sevsnp.load_amd_certificates(evidence.certificates.encode())
    assert len(chain) == 3
    sevsnp.verify_report(evidence.quote, chain, at=datetime(2026, 6, 1, tzinfo=timezone.utc))


def test_empty_certificate_table():
    assert snp_certificates_pem(b"") is None
    assert snp_certificates_pem(bytes(24)) is None


# --- NVML ---


class FakeReport:
    def __init__(self, data):
        self.attestationReport = list(data) + [0] * 16
        self.attestationReportSize = len(data)


class FakeCerts:
    def __init__(self, data):
        self.attestationCertChain = list(data) + [0] * 8
        self.attestationCertChainSize = len(data)


class FakeNvml:
    def __init__(self, count=2, broken=False):
        self.count, self.broken = count, broken

    def nvmlInit(self):
        if self.broken:
            raise RuntimeError("libnvidia-ml.so.1 not found")

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetConfComputeGpuAttestationReport(self, handle, nonce):
        return FakeReport(b"\x11\xe0\x00\x00" + bytes(nonce) + b"\x00" + b"response%d" % handle[1])

    def nvmlDeviceGetConfComputeGpuCertificate(self, handle):
        return FakeCerts(b"cert-chain-%d" % handle[1])

    def nvmlSystemGetConfComputeState(self):
        return type("State", (), {"environment": 2, "ccFeature": 1, "devToolsMode": 0})()

    def nvmlSystemGetConfComputeGpusReadyState(self):
        return 1


def test_nvidia_evidence_per_gpu():
    nonce = hashlib.sha256(b"n").digest()
    evidence = NvidiaGpuProvider(nvml=FakeNvml(count=2)).get_evidence(nonce)
    assert [e["device"] for e in evidence] == [0, 1]
    assert all(e["format"] == "nvidia-cc" for e in evidence)
    assert base64.b64decode(evidence[1]["evidence"]) == b"\x11\xe0\x00\x00" + nonce + b"\x00response1"
    assert base64.b64decode(evidence[0]["certificate"]) == b"cert-chain-0"
    assert all((e["cc_mode"], e["ready"]) == ("on", True) for e in evidence)


def test_missing_nvml_refuses_to_start_when_gpus_are_required():
    with pytest.raises(AttestationUnavailable, match="NVML is not available"):
        NvidiaGpuProvider(nvml=FakeNvml(broken=True))
    with pytest.raises(AttestationUnavailable, match="no GPU"):
        NvidiaGpuProvider(nvml=FakeNvml(count=0))
    optional = NvidiaGpuProvider(require_gpu=False, nvml=FakeNvml(broken=True))
    assert optional.device_count == 0 and optional.get_evidence(bytes(32)) == []


# --- simulated ---


def test_simulated_provider_measures_and_binds(tmp_path):
    provider = SimulatedProvider(b"code+config", state_dir=tmp_path / "state")
    evidence = provider.get_evidence(b"\x42" * 64)
    assert (evidence.tee, evidence.format, evidence.simulated) == ("simulated", "tdx-quote", True)
    quote = tdx.verify_quote(evidence.quote).quote
    assert quote.body.mr_td == hashlib.sha384(b"code+config").digest()
    assert quote.body.report_data == b"\x42" * 64
    seed_file = tmp_path / "state" / SEED_FILE
    assert seed_file.stat().st_mode & 0o777 == 0o600
    # The same state directory gives the same attestation key after a restart.
    again = SimulatedProvider(b"code+config", state_dir=tmp_path / "state").get_evidence(b"\x42" * 64)
    key = tdx.TdxQuote.from_bytes(again.quote).signature_data.attestation_key
    assert key == quote.signature_data.attestation_key


def test_simulated_keys_come_from_the_seed_and_are_not_printed():
    a, b = SimulatedTdx.from_seed(SEED), SimulatedTdx.from_seed(SEED)
    assert a.attestation_key.private_numbers() == b.attestation_key.private_numbers()
    assert SimulatedTdx.from_seed(SEED[::-1]).attestation_key.private_numbers() != a.attestation_key.private_numbers()
    assert "hidden" in repr(a)
    with pytest.raises(ValueError):
        SimulatedProvider(b"m")


class RefusingKernel(FakeKernel):
    def write(self, path, data):
        raise OSError(16, "Device or resource busy")


def test_kernel_refusal_and_empty_report_are_unavailable(tmp_path):
    with pytest.raises(AttestationUnavailable, match="refused the report request"):
        TsmProvider("tdx", base_path=tmp_path, fs=RefusingKernel()).get_evidence(bytes(64))
    with pytest.raises(AttestationUnavailable, match="empty report"):
        TsmProvider("tdx", base_path=tmp_path, fs=FakeKernel(make_outblob=lambda inblob: b"")).get_evidence(bytes(64))
    assert list(tmp_path.iterdir()) == []
