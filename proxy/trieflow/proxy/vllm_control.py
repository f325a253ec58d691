"""Thin async client for vLLM's control endpoints (need ``VLLM_SERVER_DEV_MODE=1``).

Every call has a deadline and raises :class:`ControlError` naming the step, the replica
and what went wrong, so a weight update never hangs and never fails silently.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import orjson


class ControlError(RuntimeError):
    def __init__(self, step: str, url: str, message: str) -> None:
        super().__init__(f"{step} on {url}: {message}")
        self.step = step
        self.url = url


class VllmControl:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def _call(
        self,
        step: str,
        method: str,
        url: str,
        timeout: float,
        *,
        json_body: Any = None,
        params: dict[str, str] | None = None,
    ) -> Any:
        data = orjson.dumps(json_body) if json_body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else None
        try:
            async with asyncio.timeout(timeout):
                for attempt in (1, 2):
                    try:
                        async with self._session.request(
                            method, url, data=data, params=params, headers=headers
                        ) as resp:
                            body = await resp.read()
                    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                        # vLLM drops a kept-alive connection after answering a 500; the
                        # next call on it is reset before vLLM reads it. Once more, fresh.
                        if attempt == 2:
                            raise
                        continue
                    if resp.status >= 300:
                        text = body[:500].decode(errors="replace")
                        raise ControlError(step, url, f"HTTP {resp.status}: {text}")
                    return orjson.loads(body) if body else None
        except TimeoutError:
            raise ControlError(step, url, f"no answer within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise ControlError(step, url, f"{type(exc).__name__}: {exc}") from None
        except orjson.JSONDecodeError as exc:
            raise ControlError(step, url, f"unreadable answer: {exc}") from None

    async def pause(self, base: str, mode: str, timeout: float) -> None:
        await self._call("pause", "POST", f"{base}/pause", timeout, params={"mode": mode})

    async def resume(self, base: str, timeout: float) -> None:
        await self._call("resume", "POST", f"{base}/resume", timeout)

    async def is_paused(self, base: str, timeout: float) -> bool:
        answer = await self._call("is_paused", "GET", f"{base}/is_paused", timeout)
        return bool(answer and answer.get("is_paused"))

    async def reload_weights(self, base: str, weights_path: str, timeout: float) -> None:
        body: dict[str, Any] = {"method": "reload_weights", "timeout": timeout}
        if weights_path:
            body["kwargs"] = {"weights_path": weights_path}
        await self._call(
            "reload_weights", "POST", f"{base}/collective_rpc", timeout, json_body=body
        )

    async def model_root(self, base: str, timeout: float) -> str:
        """The folder the replica was started from (``/v1/models``' ``root``)."""
        answer = await self._call("models", "GET", f"{base}/v1/models", timeout)
        models = (answer or {}).get("data") or [{}]
        root = models[0].get("root") or ""
        if not root:
            raise ControlError("models", base, "no model root in /v1/models")
        return str(root)

    async def reset_prefix_cache(self, base: str, timeout: float) -> None:
        """Drop KV blocks computed with the previous weights, running requests' included
        (they are recomputed under the new weights when they resume)."""
        answer = await self._call(
            "reset_prefix_cache",
            "POST",
            f"{base}/reset_prefix_cache",
            timeout,
            params={"reset_running_requests": "true"},
        )
        if not (answer or {}).get("success"):
            raise ControlError("reset_prefix_cache", base, f"not reset: {answer}")

    async def set_weight_version(self, base: str, version: int, timeout: float) -> None:
        await self._call(
            "update_weight_version",
            "POST",
            f"{base}/update_weight_version",
            timeout,
            json_body={"new_version": str(version)},
        )

    async def weight_version(self, base: str, timeout: float) -> str:
        answer = await self._call("weight_info", "GET", f"{base}/weight_info", timeout)
        return str((answer or {}).get("weight_version", ""))

    async def healthy(self, base: str, timeout: float) -> bool:
        try:
            await self._call("health", "GET", f"{base}/health", timeout)
        except ControlError:
            return False
        return True
