"""The encrypted link between the VMs of a multi-VM node: userspace WireGuard (`wireguard-go`,
a tun device, no kernel module) configured with `wg` and `ip`, keys made here and kept in memory.

The private key reaches `wg` through a pipe (`private-key /dev/fd/N`): it is never written to a
file. vLLM's traffic between the VMs (the rendezvous, Gloo or NCCL, its message queues) runs
over the link's addresses only, so everything the VMs exchange leaves as WireGuard UDP.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import shutil
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PrivateFormat, PublicFormat, NoEncryption

log = logging.getLogger("tee_node.link")

TOOLS = ("wireguard-go", "wg", "ip")
# wireguard-go creates the interface and its control socket asynchronously.
INTERFACE_WAIT = 10.0


class LinkError(RuntimeError):
    """The WireGuard link could not be set up (tools missing, no tun device, a command failed)."""


@dataclass(frozen=True)
class LinkKeys:
    """A WireGuard (Curve25519) key pair made in memory."""

    private_key: bytes = field(repr=False)
    public_key: bytes

    @classmethod
    def generate(cls) -> "LinkKeys":
        key = X25519PrivateKey.generate()
        return cls(
            private_key=key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption()),
            public_key=key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw),
        )

    @property
    def public_key_b64(self) -> str:
        return base64.b64encode(self.public_key).decode("ascii")


def vllm_environment(link: "WireGuardLink") -> dict[str, str]:
    """Where vLLM's processes bind and connect between VMs: the link only. VLLM_HOST_IP (its
    message queues, its own address), Gloo (CPU process groups) and NCCL (GPU) on the link's
    interface, and NCCL without InfiniBand/RoCE verbs, which bypass the IP stack and so the link."""
    return {
        "VLLM_HOST_IP": link.ip,
        "GLOO_SOCKET_IFNAME": link.interface,
        "NCCL_SOCKET_IFNAME": link.interface,
        "NCCL_IB_DISABLE": "1",
    }


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def peer_address(link_address: str, index: int) -> str:
    """The link address (CIDR) of the index-th VM: the head's is `link_address` (index 0)."""
    interface = ipaddress.ip_interface(link_address)
    address = interface.ip + index
    if address not in interface.network:
        raise LinkError(f"link network {interface.network} has no room for VM {index}")
    return f"{address}/{interface.network.prefixlen}"


def handshake_time(latest_handshakes: str, public_key: bytes) -> float | None:
    """The peer's time in `wg show IFACE latest-handshakes` output (`<b64 key>\t<unix seconds>`
    per peer, 0 before the first handshake); None when there is none."""
    wanted = base64.b64encode(public_key).decode("ascii")
    for line in latest_handshakes.splitlines():
        peer, _, seconds = line.partition("\t")
        if peer == wanted and seconds.strip().isdigit():
            return float(seconds) or None
    return None


async def _run(*argv: str, secret: bytes | None = None) -> None:
    """Run a command; `secret` goes in through a pipe whose read end the command sees as /dev/fd/N."""
    read_fd = write_fd = None
    args = list(argv)
    if secret is not None:
        read_fd, write_fd = os.pipe()
        os.write(write_fd, secret)  # 45 bytes: far below the pipe's buffer
        os.close(write_fd)
        args = [a.replace("{fd}", str(read_fd)) for a in args]
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            pass_fds=(read_fd,) if read_fd is not None else (),
        )
        _, stderr = await proc.communicate()
    finally:
        if read_fd is not None:
            os.close(read_fd)
    if proc.returncode != 0:
        raise LinkError(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} failed: {stderr.decode(errors='replace').strip()}")


class WireGuardLink:
    """One WireGuard interface: `start` brings it up with our key and address, `add_peer` admits
    one peer by its public key (and only its link address), `stop` removes the interface."""

    def __init__(self, interface: str, keys: LinkKeys, address: str, listen_port: int) -> None:
        self.interface = interface
        self.keys = keys
        self.address = address
        self.listen_port = listen_port
        self._daemon: asyncio.subprocess.Process | None = None

    @property
    def ip(self) -> str:
        return str(ipaddress.ip_interface(self.address).ip)

    async def start(self) -> None:
        missing = missing_tools()
        if missing:
            raise LinkError(f"missing {', '.join(missing)}: install wireguard-go, wireguard-tools and iproute2")
        # Foreground (-f): the interface lives as long as this process holds it, and goes with it.
        self._daemon = await asyncio.create_subprocess_exec(
            "wireguard-go", "-f", self.interface,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD": "1"},
        )
        socket = f"/var/run/wireguard/{self.interface}.sock"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + INTERFACE_WAIT
        while not os.path.exists(socket):
            if self._daemon.returncode is not None or loop.time() > deadline:
                stderr = await self._daemon.stderr.read() if self._daemon.stderr else b""
                await self.stop()
                raise LinkError(f"wireguard-go did not create {self.interface}: {stderr.decode(errors='replace').strip()[-300:]}")
            await asyncio.sleep(0.05)
        try:
            private = base64.b64encode(self.keys.private_key) + b"\n"
            await _run("wg", "set", self.interface, "private-key", "/dev/fd/{fd}", "listen-port", str(self.listen_port), secret=private)
            await _run("ip", "address", "add", self.address, "dev", self.interface)
            await _run("ip", "link", "set", self.interface, "up")
        except LinkError:
            await self.stop()
            raise
        log.info("link: WireGuard %s up at %s, UDP port %d, public key %s", self.interface, self.address, self.listen_port, self.keys.public_key_b64)

    async def add_peer(self, public_key: bytes, address: str, endpoint: str | None = None, keepalive: int | None = None) -> None:
        """Admit one peer: packets from it are accepted only with its own link address as source."""
        peer_ip = str(ipaddress.ip_interface(address).ip)
        host_bits = 32 if ipaddress.ip_address(peer_ip).version == 4 else 128
        args = ["wg", "set", self.interface, "peer", base64.b64encode(public_key).decode("ascii"), "allowed-ips", f"{peer_ip}/{host_bits}"]
        if endpoint is not None:
            args += ["endpoint", endpoint]
        if keepalive is not None:
            args += ["persistent-keepalive", str(keepalive)]
        await _run(*args)
        log.info("link: peer %s admitted at %s", base64.b64encode(public_key).decode("ascii"), peer_ip)

    async def latest_handshake(self, public_key: bytes) -> float | None:
        """Unix time of the last completed handshake with this peer (None: none yet)."""
        proc = await asyncio.create_subprocess_exec(
            "wg", "show", self.interface, "latest-handshakes", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
        )
        stdout, _ = await proc.communicate()
        return handshake_time(stdout.decode(errors="replace"), public_key)

    async def stop(self) -> None:
        daemon, self._daemon = self._daemon, None
        if daemon is None or daemon.returncode is not None:
            return
        daemon.terminate()
        try:
            await asyncio.wait_for(daemon.wait(), 5.0)
        except asyncio.TimeoutError:
            daemon.kill()
            await daemon.wait()
