"""The node's GPU path: NVML's CC state, NVIDIA collateral fetched from (fake, local) NVIDIA services,
cached and read offline, shipped in the document, and a simulated node with a fake NVML going
through the same verifier as a real one."""

from __future__ import annotations

import base64
from dataclasses import replace
from datetime import timedelta

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.x509 import ocsp
from nvidia_support import (
    AT,
    DRIVER_RIM,
    DRIVER_RIM_ID,
    TEST_CHAIN,
    VBIOS_RIM,
    VBIOS_RIM_ID,
    SampleNvml,
    issue,
    ocsp_response,
    report_bytes,
    sample_nonce,
    rim_dir,
    throwaway_device_chain,
)

from server_support import echo_config, echo_engine, free_port, wait_for

from attestation.appraisal import GpuPolicy, Policy, load_policy
from attestation.document import verify_document
from attestation.errors import AttestationUnavailable, GpuEvidenceInvalid, PolicyRefused
from attestation.producers.nvidia_collateral import NvidiaCollateral, driver_rim_id, vbios_rim_id
from attestation.nvidia.spdm import GpuAttestationReport
from attestation.nvidia.verify import verify_gpu_report
from attestation.producers.nvml import NvidiaGpuProvider
from node.server import create_app
from node.server.state import NODE

NONCE = bytes(range(32))


# --- NVML state ---


def test_cc_mode_off_or_devtools_refuses_to_start():
    with pytest.raises(AttestationUnavailable, match="not in confidential-computing mode"):
        NvidiaGpuProvider(nvml=SampleNvml(cc_feature=0))
    with pytest.raises(AttestationUnavailable, match="DEVTOOLS"):
        NvidiaGpuProvider(nvml=SampleNvml(devtools=1))


def test_devtools_switched_on_later_refuses_evidence():
    nvml = SampleNvml()
    provider = NvidiaGpuProvider(nvml=nvml)
    nvml.state.devToolsMode = 1
    with pytest.raises(AttestationUnavailable, match="DEVTOOLS"):
        provider.get_evidence(NONCE)


def test_evidence_carries_cc_mode_and_ready_state():
    nvml = SampleNvml(ready=0)
    (entry,) = NvidiaGpuProvider(nvml=nvml).get_evidence(NONCE)
    assert (entry["cc_mode"], entry["ready"]) == ("on", False)
    assert nvml.nonces == [NONCE]
    GpuAttestationReport.from_bytes(base64.b64decode(entry["evidence"]))  # the trailing buffer is cut


def test_rim_ids_from_the_report():
    report = GpuAttestationReport.from_bytes(report_bytes())
    assert driver_rim_id("GH100", report) == DRIVER_RIM_ID
    assert vbios_rim_id(report) == VBIOS_RIM_ID


# --- collateral service against fake NVIDIA services on 127.0.0.1 ---


class FakeNvidia:
    """NVIDIA's RIM service (GET /v1/rim/<id> -> {"id", "rim": b64}) and OCSP service (POST DER)."""

    def __init__(self) -> None:
        self.rims = {DRIVER_RIM_ID: DRIVER_RIM.read_bytes(), VBIOS_RIM_ID: VBIOS_RIM.read_bytes()}
        self.rim_requests: list[str] = []
        self.ocsp_requests: list[ocsp.OCSPRequest] = []
        self.forger = issue("Forger")
        self.issuers: dict[int, tuple[x509.Certificate, object]] = {}  # serial -> (cert, issuing Authority) we can sign for
        self.next_update = AT + timedelta(days=1)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/rim/{rim_id}", self.rim)
        app.router.add_post("/ocsp", self.ocsp)
        return app

    async def rim(self, request: web.Request) -> web.Response:
        rim_id = request.match_info["rim_id"]
        self.rim_requests.append(rim_id)
        if rim_id not in self.rims:
            return web.json_response({"error": "not found"}, status=404)
        return web.json_response({"id": rim_id, "rim": base64.b64encode(self.rims[rim_id]).decode()})

    async def ocsp(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/ocsp-request"
        parsed = ocsp.load_der_ocsp_request(await request.read())
        self.ocsp_requests.append(parsed)
        if parsed.serial_number in self.issuers:
            cert, issuer = self.issuers[parsed.serial_number]
            body = ocsp_response(cert, issuer.cert, issuer, next_update=self.next_update)
            return web.Response(body=body, content_type="application/ocsp-response")
        # NVIDIA's OCSP key is not ours: answer for the right certificate, signed by another key.
        chain = x509.load_pem_x509_certificates(TEST_CHAIN.read_bytes())
        cert = next((c for c in chain if c.serial_number == parsed.serial_number), chain[1])
        body = ocsp_response(cert, chain[min(chain.index(cert) + 1, len(chain) - 1)], self.forger)
        return web.Response(body=body, content_type="application/ocsp-response")


@pytest.fixture
async def nvidia_services(aiohttp_server):
    fake = FakeNvidia()
    server = await aiohttp_server(fake.app(), host="127.0.0.1")
    return fake, str(server.make_url("/v1/rim/")), str(server.make_url("/ocsp"))


def collateral_service(tmp_path, rim_url: str, ocsp_url: str, **kwargs) -> NvidiaCollateral:
    return NvidiaCollateral(
        NvidiaGpuProvider(nvml=SampleNvml()),
        rim_service_url=rim_url,
        ocsp_url=ocsp_url,
        cache_dir=tmp_path / "cache",
        now=lambda: AT,  # the sample RIMs' signing certificates expired in 2025
        **kwargs,
    )


async def test_collateral_fetched_checked_and_cached(tmp_path, nvidia_services):
    fake, rim_url, ocsp_url = nvidia_services
    service = collateral_service(tmp_path, rim_url, ocsp_url)
    assert service.document() is None
    (gpu,) = await service.refresh()
    assert fake.rim_requests == [DRIVER_RIM_ID, VBIOS_RIM_ID]
    assert (gpu.driver_rim, gpu.vbios_rim) == (DRIVER_RIM.read_bytes(), VBIOS_RIM.read_bytes())
    assert (tmp_path / "cache" / f"{DRIVER_RIM_ID}.swidtag").read_bytes() == DRIVER_RIM.read_bytes()
    # One OCSP request per certificate that needs a status: 3 of the device chain, 3 per RIM chain.
    assert len(fake.ocsp_requests) == 9
    device_chain = x509.load_pem_x509_certificates(TEST_CHAIN.read_bytes())
    asked = {r.serial_number for r in fake.ocsp_requests}
    assert {c.serial_number for c in device_chain[1:-1]} <= asked
    # The forged answers do not verify, so none is shipped.
    assert gpu.ocsp == ()
    (entry,) = service.document()
    assert entry["device"] == 0 and entry["ocsp"] == []
    assert base64.b64decode(entry["vbios_rim"]) == VBIOS_RIM.read_bytes()
    assert x509.load_pem_x509_certificates(entry["cert_chain"].encode()) == device_chain
    assert service.next_refresh_delay() == 3600.0  # nothing expires before the refresh interval

    # The next start finds the RIMs in its cache: the RIM service is not asked again.
    fake.rim_requests.clear()
    again = collateral_service(tmp_path, rim_url, ocsp_url)
    (gpu,) = await again.refresh()
    assert fake.rim_requests == [] and gpu.vbios_rim == VBIOS_RIM.read_bytes()


async def test_collateral_from_rim_dir_offline(tmp_path):
    offline = f"http://127.0.0.1:{free_port()}/"  # nothing listens: any fetch would fail
    service = collateral_service(tmp_path, offline + "v1/rim/", offline + "ocsp", rim_dir=rim_dir(tmp_path / "rims"))
    (gpu,) = await service.refresh()
    assert (gpu.driver_rim, gpu.vbios_rim, gpu.ocsp) == (DRIVER_RIM.read_bytes(), VBIOS_RIM.read_bytes(), ())


async def test_good_ocsp_is_shipped_and_sets_the_next_refresh(tmp_path, nvidia_services):
    fake, rim_url, ocsp_url = nvidia_services
    leaf, ca, root = throwaway_device_chain()
    fake.issuers[ca.cert.serial_number] = (ca.cert, root)  # the one device certificate that needs a status
    fake.next_update = AT + timedelta(hours=1)
    service = NvidiaCollateral(
        NvidiaGpuProvider(nvml=SampleNvml(device_chain=[leaf, ca, root])),
        rim_service_url=rim_url, ocsp_url=ocsp_url, cache_dir=tmp_path / "cache", now=lambda: AT,
    )
    (gpu,) = await service.refresh()
    (der,) = gpu.ocsp  # the RIM chains' answers were forged and dropped
    assert ocsp.load_der_ocsp_response(der).serial_number == ca.cert.serial_number
    assert gpu.expires == fake.next_update
    assert service.next_refresh_delay() == 1800.0  # halfway to the OCSP response's next_update


async def test_ocsp_from_rim_dir_offline(tmp_path):
    leaf, ca, root = throwaway_device_chain()
    offline = rim_dir(tmp_path / "rims")
    (offline / "identity.ocsp").write_bytes(ocsp_response(ca.cert, root.cert, root))
    (offline / "other.ocsp").write_bytes(ocsp_response(leaf.cert, ca.cert, ca))  # for a certificate not asked about
    nowhere = f"http://127.0.0.1:{free_port()}/"
    service = NvidiaCollateral(
        NvidiaGpuProvider(nvml=SampleNvml(device_chain=[leaf, ca, root])),
        rim_service_url=nowhere, ocsp_url=nowhere, rim_dir=offline, cache_dir=tmp_path / "cache", now=lambda: AT,
    )
    (gpu,) = await service.refresh()
    assert gpu.ocsp == ((offline / "identity.ocsp").read_bytes(),)
    assert gpu.driver_rim == DRIVER_RIM.read_bytes()


async def test_a_rim_that_does_not_verify_is_not_shipped(tmp_path, nvidia_services):
    fake, rim_url, ocsp_url = nvidia_services
    fake.rims[VBIOS_RIM_ID] = fake.rims[VBIOS_RIM_ID].replace(b'index="1" active="True"', b'index="1" active="False"')
    del fake.rims[DRIVER_RIM_ID]
    (gpu,) = await collateral_service(tmp_path, rim_url, ocsp_url).refresh()
    assert (gpu.driver_rim, gpu.vbios_rim) == (None, None)
    assert not (tmp_path / "cache" / f"{VBIOS_RIM_ID}.swidtag").exists()


# --- a simulated node with a fake NVML: the same document verifier ---


async def gpu_document(make_node, tmp_path, nvml: SampleNvml) -> dict:
    nowhere = f"http://127.0.0.1:{free_port()}/"  # nothing listens: the RIMs come from gpu_rim_dir
    settings = {"gpu_rim_dir": str(rim_dir(tmp_path / "rims")), "nvidia_rim_service_url": nowhere, "nvidia_ocsp_url": nowhere}
    node = await make_node(attestation=settings, cache_dir=str(tmp_path / "cache"))
    service = node.state.attestation
    service.attach_gpu(NvidiaGpuProvider(nvml=nvml), now=lambda: AT)
    await service.nvidia.refresh()
    response = await node.client.get(f"/v1/attestation?nonce={NONCE.hex()}")
    assert response.status == 200
    return await response.json()


async def test_simulated_node_with_the_real_sample_is_refused_for_its_nonce_only(make_node, tmp_path):
    doc = await gpu_document(make_node, tmp_path, SampleNvml())
    (entry,) = doc["gpu_evidence"]
    assert (entry["cc_mode"], entry["ready"]) == ("on", True)
    (shipped,) = doc["collateral"]["nvidia"]
    assert base64.b64decode(shipped["driver_rim"]) == DRIVER_RIM.read_bytes()
    for require_gpu in (True, False):  # evidence that is present must verify, required or not
        with pytest.raises(GpuEvidenceInvalid) as info:
            verify_document(doc, expected_nonce=NONCE, policy=Policy(allow_simulated=True, require_gpu=require_gpu), at=AT)
        # Signature, chain and RIMs all hold: the one failure listed is the replayed nonce.
        assert str(info.value) == (
            "GPU 0 evidence does not verify: NonceMismatch: the GPU report answers a different nonce than the one expected"
        )
    # The same shipped evidence and collateral, checked against the nonce NVIDIA signed, verify and match.
    result = verify_gpu_report(
        base64.b64decode(entry["evidence"]),
        base64.b64decode(entry["certificate"]),
        nonce=sample_nonce(),
        rims=[base64.b64decode(shipped["driver_rim"]), base64.b64decode(shipped["vbios_rim"])],
        at=AT,
    )
    assert result.valid and result.measurements == "match", result.errors


async def test_simulated_node_fresh_report_goes_through_the_same_verifier_and_policy(make_node, tmp_path):
    chain = throwaway_device_chain()
    doc = await gpu_document(make_node, tmp_path, SampleNvml(device_chain=chain))
    required = Policy(allow_simulated=True, require_gpu=True)
    with pytest.raises(GpuEvidenceInvalid, match="not a pinned root"):
        verify_document(doc, expected_nonce=NONCE, policy=required, at=AT)
    roots = (chain[-1].cert,)  # trusted explicitly: the only departure from a real node's path
    # Everything verifies; the default policy still wants OCSP answers that no one here can sign.
    with pytest.raises(PolicyRefused) as info:
        verify_document(doc, expected_nonce=NONCE, policy=required, at=AT, gpu_device_roots=roots)
    assert len(info.value.errors) == 1 and info.value.errors[0].startswith("gpu 0 ocsp status is unknown")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        'allow_simulated = true\nrequire_gpu = true\n\n[gpu]\nallow_ocsp_unknown = true\n'
        'min_driver_version = "545.00"\nallowed_vbios_versions = ["96.00.5e.00.01"]\n'
    )
    accepted = verify_document(doc, expected_nonce=NONCE, policy=load_policy(policy_file), at=AT, gpu_device_roots=roots)
    (gpu,) = accepted.claims.gpus
    assert (gpu.measurements, gpu.measurements_checked, gpu.cc_mode, gpu.ready) == ("match", 32, "on", True)
    assert accepted.gpu_verified
    newer = replace(load_policy(policy_file), gpu=GpuPolicy(allow_ocsp_unknown=True, min_driver_version="550.54.15"))
    with pytest.raises(PolicyRefused, match="driver_version 545.00 is below the policy minimum 550.54.15"):
        verify_document(doc, expected_nonce=NONCE, policy=newer, at=AT, gpu_device_roots=roots)


async def test_gpu_not_ready_is_refused(make_node, tmp_path):
    chain = throwaway_device_chain()
    doc = await gpu_document(make_node, tmp_path, SampleNvml(device_chain=chain, ready=0))
    policy = Policy(allow_simulated=True, gpu=GpuPolicy(allow_ocsp_unknown=True))
    with pytest.raises(PolicyRefused, match="gpu 0 is not reported ready"):
        verify_document(doc, expected_nonce=NONCE, policy=policy, at=AT, gpu_device_roots=(chain[-1].cert,))


async def test_node_fetches_collateral_at_start(aiohttp_client, tmp_path):
    nowhere = f"http://127.0.0.1:{free_port()}/"
    settings = {"gpu_rim_dir": str(rim_dir(tmp_path / "rims")), "nvidia_rim_service_url": nowhere, "nvidia_ocsp_url": nowhere}
    app = create_app(echo_config(attestation=settings, cache_dir=str(tmp_path / "cache")), echo_engine())
    service = app[NODE].attestation
    service.attach_gpu(NvidiaGpuProvider(nvml=SampleNvml()), now=lambda: AT)
    await aiohttp_client(app)  # starts the app: its lifecycle begins the refresh loop
    await wait_for(lambda: service.nvidia.document() is not None, what="first collateral refresh")
    (entry,) = service.collateral()["nvidia"]
    assert base64.b64decode(entry["driver_rim"]) == DRIVER_RIM.read_bytes()
