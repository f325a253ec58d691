"""The operator's only way to write to Kubernetes: raw JSON over the async client.

Manifests stay plain dicts end to end (the builders return them, the apiserver takes them);
no typed models are involved, so nothing is dropped or reformatted on the way, and custom
resources (PodGroup, RLJob) go through the same four verbs as core objects. Every write
carries the operator's field manager.

Server-side apply is not used: on 1.20 it is beta and its managed-field handling differs by
type; create, then merge-patch on conflict, is idempotent and enough here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from kubernetes.aio import client as aio_client
from kubernetes.aio import config as aio_config

from trieflow.api import API_VERSION, PLURAL
from trieflow.operator.labels import FIELD_MANAGER
from trieflow.operator.podgroup import COSCHEDULING_API, VOLCANO_API

MERGE_PATCH: Final = "application/merge-patch+json"
PEERING_API: Final = "kopf.dev/v1"

#: (apiVersion, kind) -> plural, for every kind the operator reads or writes.
PLURALS: Final[dict[tuple[str, str], str]] = {
    ("v1", "Pod"): "pods",
    ("v1", "Service"): "services",
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "ServiceAccount"): "serviceaccounts",
    ("v1", "Event"): "events",
    ("rbac.authorization.k8s.io/v1", "Role"): "roles",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "rolebindings",
    ("networking.k8s.io/v1", "NetworkPolicy"): "networkpolicies",
    (VOLCANO_API, "PodGroup"): "podgroups",
    (COSCHEDULING_API, "PodGroup"): "podgroups",
    (API_VERSION, "RLJob"): PLURAL,
    (PEERING_API, "ClusterKopfPeering"): "clusterkopfpeerings",
}
#: Kinds without a namespace.
CLUSTER_SCOPED: Final = frozenset({(PEERING_API, "ClusterKopfPeering")})


class KubeError(Exception):
    """A non-2xx answer, with the apiserver's Status message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


def object_path(api_version: str, kind: str, namespace: str | None, name: str | None = None) -> str:
    """REST path of a collection, or of one object in it."""
    try:
        plural = PLURALS[(api_version, kind)]
    except KeyError:
        raise ValueError(f"the operator does not manage {kind} ({api_version})") from None
    base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    if (api_version, kind) in CLUSTER_SCOPED:
        path = f"{base}/{plural}"
    else:
        path = f"{base}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


@dataclass(frozen=True)
class Connection:
    """Where the apiserver is and how to authenticate (shared with Kopf's login handler)."""

    server: str
    ca_path: str | None
    verify_ssl: bool
    token: str | None
    cert_path: str | None
    key_path: str | None


class Kube:
    """Async JSON client for the apiserver (create, get, merge-patch, delete)."""

    def __init__(self, api: aio_client.ApiClient, field_manager: str = FIELD_MANAGER) -> None:
        self.api = api
        self.field_manager = field_manager

    @classmethod
    async def connect(cls, kubeconfig: str | None = None, context: str | None = None) -> Kube:
        """In-cluster credentials when running in a pod, else the kubeconfig."""
        configuration = aio_client.Configuration()
        if kubeconfig is None and _in_cluster():
            aio_config.load_incluster_config(client_configuration=configuration)
        else:
            await aio_config.load_kube_config(
                config_file=kubeconfig, context=context, client_configuration=configuration
            )
        configuration.connection_pool_maxsize = 32
        return cls(aio_client.ApiClient(configuration))

    async def connection(self) -> Connection:
        configuration = self.api.configuration
        header = await configuration.get_api_key_with_prefix("BearerToken", alias="authorization")
        token = header.split(" ", 1)[-1] if header else None
        return Connection(
            server=configuration.host,
            ca_path=configuration.ssl_ca_cert,
            verify_ssl=bool(configuration.verify_ssl),
            token=token,
            cert_path=configuration.cert_file,
            key_path=configuration.key_file,
        )

    async def close(self) -> None:
        await self.api.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        query: Sequence[tuple[str, str]] = (),
        body: Any = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        """One call; the decoded JSON answer, or KubeError."""
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        serialized = await self.api.param_serialize(
            method,
            path,
            query_params=list(query) or None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        method_, url, header_params, payload, post_params = serialized
        response = await self.api.call_api(method_, url, header_params, payload, post_params)
        data = await response.read()
        try:
            decoded: Any = json.loads(data) if data else {}
        except ValueError:  # e.g. "404 page not found" for a kind whose CRD is missing
            decoded = data.decode(errors="replace").strip()
        if not 200 <= response.status < 300:
            if isinstance(decoded, dict):
                message, reason = decoded.get("message", ""), decoded.get("reason", "")
            else:
                message, reason = f"{path} is not served here (is its CRD installed?)", ""
            raise KubeError(response.status, reason or str(response.reason), message)
        return decoded if isinstance(decoded, dict) else {}

    async def get(
        self, api_version: str, kind: str, namespace: str | None, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self.request("GET", object_path(api_version, kind, namespace, name))
        except KubeError as error:
            if error.status == 404:
                return None
            raise

    async def create(self, manifest: dict[str, Any]) -> dict[str, Any]:
        meta = manifest["metadata"]
        path = object_path(manifest["apiVersion"], manifest["kind"], meta.get("namespace"))
        return await self.request(
            "POST", path, query=[("fieldManager", self.field_manager)], body=manifest
        )

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        *,
        subresource: str | None = None,
    ) -> dict[str, Any]:
        path = object_path(api_version, kind, namespace, name)
        if subresource:
            path = f"{path}/{subresource}"
        return await self.request(
            "PATCH",
            path,
            query=[("fieldManager", self.field_manager)],
            body=patch,
            content_type=MERGE_PATCH,
        )

    async def delete(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        *,
        grace_period_seconds: int | None = None,
        propagation: str = "Background",
    ) -> bool:
        """Delete; False if it was already gone."""
        body: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": propagation,
        }
        if grace_period_seconds is not None:
            body["gracePeriodSeconds"] = grace_period_seconds
        try:
            await self.request("DELETE", object_path(api_version, kind, namespace, name), body=body)
        except KubeError as error:
            if error.status == 404:
                return False
            raise
        return True

    async def apply(self, manifest: dict[str, Any]) -> str:
        """Create, or merge-patch the operator's fields if it exists: 'created'/'patched'."""
        try:
            await self.create(manifest)
            return "created"
        except KubeError as error:
            if error.status != 409:
                raise
        meta = manifest["metadata"]
        await self.patch(
            manifest["apiVersion"], manifest["kind"], meta["namespace"], meta["name"], manifest
        )
        return "patched"

    async def create_if_absent(self, manifest: dict[str, Any]) -> bool:
        """Create; False when it already exists (pods are never patched, only replaced)."""
        try:
            await self.create(manifest)
        except KubeError as error:
            if error.status == 409:
                return False
            raise
        return True


def _in_cluster() -> bool:
    import os

    return "KUBERNETES_SERVICE_HOST" in os.environ and os.path.exists(
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    )
