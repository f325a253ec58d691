"""The proxy's ports bind where the sandbox pod needs them.

The agents' OpenAI port is for the agent beside the proxy only (loopback); the gRPC port
(trainer intake, weight updates) and the admin port (metrics, readiness probe) must be
reachable from other pods. 127.0.0.2 stands in for the pod's own address: it reaches
sockets bound to 0.0.0.0 but not those bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trieflow.testenv.localhost import free_port, log_tail

OTHER_ADDRESS = "127.0.0.2"


def _reachable(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("service_host", [None, "0.0.0.0"])
def test_service_ports_bind_apart_from_the_agent_port(
    tmp_path: Path, service_host: str | None
) -> None:
    ready = tmp_path / "ready.json"
    log = tmp_path / "proxy.log"
    cmd = [
        sys.executable, "-m", "trieflow.proxy.main",
        "--upstream", f"http://127.0.0.1:{free_port()}",  # nothing listens: not needed here
        "--wal-dir", str(tmp_path / "wal"), "--ready-file", str(ready),
        "--host", "127.0.0.1", "--port", "0", "--admin-port", "0",
        "--grpc-port", str(free_port()),
    ]  # fmt: skip
    if service_host is not None:
        cmd += ["--service-host", service_host]
    with log.open("wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, log_tail(log)
            assert time.monotonic() < deadline, log_tail(log)
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        for name in ("port", "admin_port", "grpc_port"):
            assert _reachable("127.0.0.1", ports[name]), name
        assert not _reachable(OTHER_ADDRESS, ports["port"])  # the agent's port stays private
        exposed = service_host is not None
        assert _reachable(OTHER_ADDRESS, ports["grpc_port"]) is exposed
        assert _reachable(OTHER_ADDRESS, ports["admin_port"]) is exposed
    finally:
        process.terminate()
        process.wait(15)
