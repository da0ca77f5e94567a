"""Safe defaults: `conceptlens serve` binds loopback unless told otherwise, the metrics port follows `--host`
unless `--metrics-host` is given, and the deploy files ask for all interfaces explicitly. Checked on the real
server's listening sockets (/proc/net/tcp) and by connecting from a non-loopback address of this machine."""

from __future__ import annotations

import argparse
import ipaddress
import socket
from pathlib import Path

import pytest
from serving_helpers import config, make_repo

from conceptlens.server.background import BackgroundServer
from conceptlens.server.cli import build_config, configure

ROOT = Path(__file__).resolve().parents[2]


def _args(tmp_path: Path, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    configure(parser)
    return parser.parse_args(["--models", str(tmp_path), *flags])


def test_defaults_bind_loopback_and_metrics_follow_host(tmp_path):
    default = build_config(_args(tmp_path, "--metrics-port", "9090"))
    assert (default.host, default.metrics_bind) == ("127.0.0.1", "127.0.0.1")
    everywhere = build_config(_args(tmp_path, "--host", "0.0.0.0"))
    assert everywhere.metrics_bind == "0.0.0.0"
    assert build_config(_args(tmp_path, "--host", "[::]")).metrics_bind == "::"  # gRPC's brackets dropped
    split = build_config(_args(tmp_path, "--host", "0.0.0.0", "--metrics-host", "127.0.0.1"))
    assert (split.host, split.metrics_bind) == ("0.0.0.0", "127.0.0.1")


def _address(hex_address: str) -> str:
    """The kernel's hex socket address as an IP; IPv4-mapped IPv6 (how gRPC binds 127.0.0.1) as IPv4."""
    raw = bytes.fromhex(hex_address)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # each 32-bit word in host order
    ip = ipaddress.ip_address(words)
    return str(ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else str(ip)


def _listening(port: int) -> set[str]:
    """Local addresses listening on TCP `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            address, hex_port = fields[1].split(":")
            if int(hex_port, 16) == port and fields[3] == "0A":  # 0A = LISTEN
                found.add(_address(address))
    return found


LOOPBACK_V4 = "127.0.0.1"
ANY = {"0.0.0.0", "::"}


def _outward_address() -> str | None:
    """A non-loopback IPv4 address of this machine (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: only routing is consulted
            address = probe.getsockname()[0]
        except OSError:
            return None
    return None if address.startswith("127.") else address


def _reachable(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="reads the kernel's socket table (Linux)")
def test_loopback_server_is_not_reachable_from_outside(bundle_dir, tmp_path):
    repo = make_repo(tmp_path / "repo", bundle_dir)
    outward = _outward_address()
    with BackgroundServer(config(repo, host="127.0.0.1")) as server:
        assert _listening(server.port) == {LOOPBACK_V4}
        assert _listening(server.metrics_port) == {LOOPBACK_V4}
        assert _reachable("127.0.0.1", server.metrics_port)
        if outward is not None:
            assert not _reachable(outward, server.port)
            assert not _reachable(outward, server.metrics_port)
    # the control: asked for all interfaces, both ports listen on all of them
    with BackgroundServer(config(repo, host="0.0.0.0")) as server:
        assert _listening(server.port) and _listening(server.port) <= ANY  # gRPC binds 0.0.0.0 as dual-stack ::
        assert _listening(server.metrics_port) and _listening(server.metrics_port) <= ANY
        if outward is not None:
            assert _reachable(outward, server.metrics_port)


def test_make_serve_and_deploy_files_say_which_interfaces():
    makefile = (ROOT / "Makefile").read_text()
    assert "HOST ?= 127.0.0.1" in makefile and "--host $(HOST)" in makefile
    for name in ("Dockerfile", "Dockerfile.cuda", "docker-compose.yml"):
        assert '"--host", "0.0.0.0"' in (ROOT / "deploy" / name).read_text(), name
    assert "- --host=0.0.0.0" in (ROOT / "deploy" / "k8s" / "base" / "deployment.yaml").read_text()
