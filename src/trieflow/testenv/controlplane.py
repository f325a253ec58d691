"""A real, loopback-only Kubernetes control plane: etcd, apiserver, controller-manager, scheduler.

Every component is a real binary with RBAC and token authentication on; only the kubelet
is missing, and `nodesim` plays it. Processes run in their own sessions so that
`trieflow testenv up` can return while they keep running; `stop()` (or `down`) ends them.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from trieflow.testenv.binaries import KubeBinaries
from trieflow.testenv.localhost import free_port, log_tail
from trieflow.testenv.pki import write_pki

SERVICE_CIDR = "10.96.0.0/12"
SERVICE_IP = "10.96.0.1"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
STATE_FILE = "state.json"


class ControlPlaneError(RuntimeError):
    """A component failed to start; the message carries the end of its log."""


@dataclass
class ProcessRecord:
    name: str
    pid: int
    start_ticks: int | None
    binary: str
    log: str


@dataclass
class ControlPlaneState:
    """What `down` and `env` need to find a running control plane from another process."""

    directory: str
    apiserver_url: str
    kubeconfig: str
    processes: list[ProcessRecord] = field(default_factory=list)

    def save(self) -> None:
        Path(self.directory, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, directory: Path) -> ControlPlaneState | None:
        path = directory / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["processes"] = [ProcessRecord(**p) for p in raw["processes"]]
        return cls(**raw)


def kubeconfig(server: str, ca_cert: Path, user: str, token: str) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "trieflow-testenv",
                "cluster": {"server": server, "certificate-authority": str(ca_cert)},
            }
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [
            {"name": "trieflow-testenv", "context": {"cluster": "trieflow-testenv", "user": user}}
        ],
        "current-context": "trieflow-testenv",
    }


def process_start_ticks(pid: int) -> int | None:
    """The kernel's start time of `pid` (None when gone or a zombie): a pid-reuse-proof id."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _is_running(record: ProcessRecord) -> bool:
    """True when the pid is alive and is still the process we started (no pid reuse)."""
    ticks = process_start_ticks(record.pid)
    return ticks is not None and ticks == record.start_ticks


def terminate(records: list[ProcessRecord], timeout: float = 15.0) -> None:
    """SIGTERM each process group, then SIGKILL what is left after the timeout."""
    alive = [r for r in records if _is_running(r)]
    for r in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        _reap()
        alive = [r for r in alive if _is_running(r)]
        time.sleep(0.1)
    for r in alive:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(r.pid, signal.SIGKILL)
    _reap()


def _reap() -> None:
    """Collect exited children so they do not linger as zombies (and look alive)."""
    try:
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass
    except ChildProcessError:
        pass


class ControlPlane:
    """Start and stop one control plane whose files all live in `directory`."""

    def __init__(self, directory: Path, binaries: KubeBinaries) -> None:
        self.directory = directory
        self.binaries = binaries
        self.logs = directory / "logs"
        self.admin_token = secrets.token_hex(16)
        self.state: ControlPlaneState | None = None

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    def start(self, timeout: float = 120.0) -> ControlPlaneState:
        for sub in ("etcd", "pki", "logs"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        pki = write_pki(self.directory / "pki", SERVICE_IP)
        etcd_port, peer_port, api_port = free_port(), free_port(), free_port()
        api_url = f"https://127.0.0.1:{api_port}"
        tokens = {
            "admin": (self.admin_token, "trieflow-admin", "system:masters"),
            "kcm": (secrets.token_hex(16), "system:kube-controller-manager", ""),
            "scheduler": (secrets.token_hex(16), "system:kube-scheduler", ""),
        }
        token_file = self.directory / "pki" / "tokens.csv"
        token_file.write_text(
            "".join(f'{tok},{user},{user},"{grp}"\n' for tok, user, grp in tokens.values())
        )
        token_file.chmod(0o600)
        for key, (tok, user, _) in tokens.items():
            name = "kubeconfig" if key == "admin" else f"{key}.kubeconfig"
            path = self.directory / name
            path.write_text(yaml.safe_dump(kubeconfig(api_url, pki.ca_cert, user, tok)))
            path.chmod(0o600)

        self.state = ControlPlaneState(str(self.directory), api_url, str(self.kubeconfig))
        try:
            self._spawn(
                "etcd",
                self.binaries.etcd,
                [
                    "--name=default",
                    f"--data-dir={self.directory / 'etcd'}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                    f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                    "--log-level=warn",
                ],
            )
            self._wait("etcd", lambda: _http_ok(f"http://127.0.0.1:{etcd_port}/health"), timeout)
            self._spawn(
                "kube-apiserver",
                self.binaries.apiserver,
                [
                    f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                    "--bind-address=127.0.0.1",
                    "--advertise-address=127.0.0.1",
                    f"--secure-port={api_port}",
                    "--insecure-port=0",
                    f"--tls-cert-file={pki.serving_cert}",
                    f"--tls-private-key-file={pki.serving_key}",
                    f"--token-auth-file={token_file}",
                    "--anonymous-auth=false",
                    "--authorization-mode=RBAC",
                    f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
                    f"--service-account-key-file={pki.sa_public_key}",
                    f"--service-account-signing-key-file={pki.sa_private_key}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    f"--cert-dir={self.directory / 'pki'}",
                    "--profiling=false",
                    "--v=1",
                ],
            )
            ca = ssl.create_default_context(cafile=str(pki.ca_cert))
            self._wait(
                "kube-apiserver",
                lambda: _http_ok(f"{api_url}/readyz", token=self.admin_token, context=ca),
                timeout,
            )
            kcm_port, sched_port = free_port(), free_port()
            self._spawn(
                "kube-controller-manager",
                self.binaries.controller_manager,
                [
                    f"--kubeconfig={self.directory / 'kcm.kubeconfig'}",
                    "--controllers=*",
                    "--leader-elect=false",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={pki.sa_private_key}",
                    f"--root-ca-file={pki.ca_cert}",
                    f"--service-cluster-ip-range={SERVICE_CIDR}",
                    "--address=127.0.0.1",
                    f"--port={kcm_port}",
                    "--secure-port=0",
                    "--v=1",
                ],
            )
            self._spawn(
                "kube-scheduler",
                self.binaries.scheduler,
                [
                    f"--kubeconfig={self.directory / 'scheduler.kubeconfig'}",
                    "--leader-elect=false",
                    "--address=127.0.0.1",
                    f"--port={sched_port}",
                    "--secure-port=0",
                    "--v=1",
                ],
            )
            self._wait(
                "kube-controller-manager",
                lambda: _http_ok(f"http://127.0.0.1:{kcm_port}/healthz"),
                timeout,
            )
            self._wait(
                "kube-scheduler",
                lambda: _http_ok(f"http://127.0.0.1:{sched_port}/healthz"),
                timeout,
            )
        except BaseException:
            self.stop()
            raise
        return self.state

    def stop(self) -> None:
        if self.state is not None:
            terminate(list(reversed(self.state.processes)))
            self.state.processes.clear()
            self.state.save()

    def _spawn(self, name: str, binary: Path, args: list[str]) -> None:
        assert self.state is not None
        if not binary.exists():
            raise ControlPlaneError(f"{name}: binary {binary} does not exist")
        log = self.logs / f"{name}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [str(binary), *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.directory,
            )
        record = ProcessRecord(name, proc.pid, process_start_ticks(proc.pid), str(binary), str(log))
        self.state.processes.append(record)
        self.state.save()

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        """Poll until `ready()`; fail fast with the log tail when the process dies."""
        assert self.state is not None
        record = next(p for p in self.state.processes if p.name == name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap()
            if not _is_running(record):
                raise ControlPlaneError(
                    f"{name} exited during start-up; end of {record.log}:\n"
                    f"{log_tail(Path(record.log))}"
                )
            if ready():
                return
            time.sleep(0.2)
        raise ControlPlaneError(
            f"{name} not ready after {timeout:.0f}s; end of {record.log}:\n"
            f"{log_tail(Path(record.log))}"
        )


def _http_ok(url: str, token: str | None = None, context: ssl.SSLContext | None = None) -> bool:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError, ssl.SSLError):
        return False
