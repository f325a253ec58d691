"""A real proxy process for runner tests that need no model (agents here make no calls)."""

from __future__ import annotations

from tests.proxy.conftest import ProxyFactory, ProxyProcess, start_proxy

__all__ = ["ProxyFactory", "ProxyProcess", "start_proxy"]
