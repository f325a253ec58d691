"""The proxy in front of a real vLLM (CPU, tiny model), driven by the official openai client."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, cast

import grpc
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from tests.proxy.conftest import MODEL_NAME, ProxyFactory, ProxyProcess, Vllm

from trieflow.proxy.tree_export import sequence_path
from trieflow.v1 import trajectory_pb2

pytestmark = pytest.mark.vllm

VOLATILE = {"id", "created"}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def chat(agent: openai.OpenAI, **kwargs: Any) -> ChatCompletion:
    """One non-streaming chat call (typed loosely: tests send vLLM-only fields too)."""
    return cast(ChatCompletion, cast(Any, agent.chat.completions).create(**kwargs))


def chat_stream(agent: openai.OpenAI, **kwargs: Any) -> list[ChatCompletionChunk]:
    return list(cast(Any, agent.chat.completions).create(stream=True, **kwargs))


def comparable(obj: Any) -> Any:
    """A response as a dict without the fields that differ between any two calls."""
    data = obj.model_dump() if hasattr(obj, "model_dump") else obj
    data = {k: v for k, v in data.items() if k not in VOLATILE}
    for choice in data.get("choices") or ():
        for call in (choice.get("message") or {}).get("tool_calls") or ():
            call.pop("id", None)  # vLLM draws a fresh tool-call id per call
    return data


def pull_all(
    proxy: ProxyProcess, expected: int, ack: bool = True
) -> list[trajectory_pb2.Trajectory]:
    with proxy.grpc() as client:
        stream = client.pull(max_unacked=expected, timeout=30)
        trees = [next(stream).trajectory for _ in range(expected)]
        stream.cancel()
        if ack:
            assert client.ack(t.trajectory_id for t in trees).acknowledged == expected
    return trees


def path_tokens(tree: trajectory_pb2.Trajectory, number: int) -> list[int]:
    return [t for t, _, _ in sequence_path(tree, number)]


@pytest.fixture
def proxy(vllm: Vllm, start_proxy: ProxyFactory) -> ProxyProcess:
    return start_proxy(vllm.url)


# -- transparency -------------------------------------------------------------------------


def test_non_streaming_equals_direct_in_every_field(vllm: Vllm, proxy: ProxyProcess) -> None:
    with proxy.grpc() as control:
        episode = control.start_episode("transparency")
    agent, direct = proxy.agent(api_key=episode.api_key), vllm.client()
    for extra in (
        {},
        {"logprobs": True, "top_logprobs": 2},
        {"extra_body": {"return_token_ids": True}},
    ):
        kwargs: dict[str, Any] = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 12}
        kwargs |= {"temperature": 0.0, **extra}
        assert comparable(chat(agent, **kwargs)) == comparable(chat(direct, **kwargs))
    completion: dict[str, Any] = {"model": MODEL_NAME, "prompt": "Once upon", "max_tokens": 8}
    completion |= {"n": 2, "seed": 11, "temperature": 1.0}
    assert comparable(cast(Any, agent.completions).create(**completion)) == comparable(
        cast(Any, direct.completions).create(**completion)
    )


def test_streaming_equals_direct_chunk_by_chunk(vllm: Vllm, proxy: ProxyProcess) -> None:
    with proxy.grpc() as control:
        episode = control.start_episode("stream")
    agent, direct = proxy.agent(session=episode.session_id), vllm.client()
    kwargs: dict[str, Any] = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 16}
    kwargs |= {"n": 2, "seed": 5, "stream_options": {"include_usage": True}}
    proxied = stream_summary(chat_stream(agent, **kwargs))
    expected = stream_summary(chat_stream(direct, **kwargs))
    assert proxied == expected
    assert proxied["usage"]["completion_tokens"] > 0


def nulls(data: dict[str, Any]) -> tuple[tuple[str, bool], ...]:
    """Which fields a chunk has and which are null: catches any field leaking through."""
    return tuple(sorted((k, v is None) for k, v in data.items()))


def stream_summary(chunks: list[ChatCompletionChunk]) -> dict[str, Any]:
    """What a streaming client gets, independent of chunk boundaries: vLLM merges tokens
    into fewer chunks when its output loop falls behind, and interleaves the n choices
    differently from run to run, so only per-choice text, ends and field shapes are stable.
    """
    summary: dict[str, Any] = {"shapes": set(), "usage": None}
    for chunk in chunks:
        data = comparable(chunk)
        summary["shapes"].add(nulls(data))
        summary["usage"] = data.get("usage") or summary["usage"]
        for choice in data["choices"]:
            summary["shapes"].add(nulls(choice) + nulls(choice["delta"]))
            text, ends = summary.setdefault(choice["index"], ("", []))
            ends = [*ends, choice["finish_reason"]] if choice["finish_reason"] else ends
            summary[choice["index"]] = (text + (choice["delta"]["content"] or ""), ends)
    return summary


def test_other_paths_pass_through_and_control_paths_are_blocked(
    vllm: Vllm, proxy: ProxyProcess
) -> None:
    assert httpx.get(f"{proxy.url}/v1/models").json()["data"][0]["id"] == MODEL_NAME
    tokenized = httpx.post(f"{proxy.url}/tokenize", json={"model": MODEL_NAME, "prompt": "hi"})
    assert (
        tokenized.json()
        == httpx.post(f"{vllm.url}/tokenize", json={"model": MODEL_NAME, "prompt": "hi"}).json()
    )
    blocked = httpx.post(f"{proxy.url}/pause", params={"mode": "keep"})
    assert blocked.status_code == 403
    assert "Rollout Manager" in blocked.json()["error"]["message"]
    assert httpx.get(f"{vllm.url}/is_paused").json() == {"is_paused": False}


# -- recording ------------------------------------------------------------------------------


def test_recorded_ids_and_logprobs_are_what_vllm_returned(proxy: ProxyProcess) -> None:
    with proxy.grpc() as control:
        episode = control.start_episode("ids", metadata={"split": "train"})
        agent = proxy.agent(api_key=episode.api_key)
        ask = {"return_token_ids": True}
        whole = chat(
            agent, model=MODEL_NAME, messages=MESSAGES, max_tokens=10, logprobs=True, extra_body=ask
        )
        streamed_ids: dict[int, list[int]] = {}
        streamed_lp: dict[int, list[float]] = {}
        prompt: list[int] = []
        for chunk in chat_stream(agent, model=MODEL_NAME, messages=MESSAGES, max_tokens=10, n=2,
            logprobs=True, extra_body=ask,
        ):  # fmt: skip
            extra = chunk.model_extra or {}
            prompt = extra.get("prompt_token_ids") or prompt
            for choice in chunk.choices:
                streamed_ids.setdefault(choice.index, []).extend(
                    (choice.model_extra or {}).get("token_ids") or []
                )
                if choice.logprobs and choice.logprobs.content:
                    streamed_lp.setdefault(choice.index, []).extend(
                        c.logprob for c in choice.logprobs.content
                    )
        done = control.finish_episode(episode.episode_id, {"reward": 0.25})
    assert done.sequences == 3
    (tree,) = pull_all(proxy, 1)
    assert tree.rewards["reward"] == 0.25
    assert tree.metadata["split"] == "train"
    assert tree.task_id == "ids"
    whole_extra = whole.model_extra or {}
    whole_choice = whole.choices[0]
    assert whole_choice.logprobs is not None
    assert whole_choice.logprobs.content is not None
    expected = [
        (
            whole_extra["prompt_token_ids"],
            (whole_choice.model_extra or {})["token_ids"],
            [c.logprob for c in whole_choice.logprobs.content],
        ),
        (prompt, streamed_ids[0], streamed_lp[0]),
        (prompt, streamed_ids[1], streamed_lp[1]),
    ]
    for number, (prompt_ids, output_ids, logprobs) in enumerate(expected):
        call = tree.calls[number]
        assert path_tokens(tree, number) == prompt_ids + output_ids
        assert call.prompt_length == len(prompt_ids)
        assert call.completion_length == len(output_ids)
        recorded = [lp for _, lp, _ in sequence_path(tree, number)[len(prompt_ids) :]]
        assert recorded == pytest.approx(logprobs, abs=1e-6)
        assert call.weight_version_first == 0
        assert call.finish_reason in {"length", "stop"}
        assert call.timings.received_ns <= call.timings.upstream_sent_ns
        assert call.timings.upstream_sent_ns <= call.timings.upstream_done_ns
        assert call.timings.upstream_done_ns <= call.timings.responded_ns
    assert tree.flat_tokens > tree.unique_tokens  # the two samples share their prompt


def test_multi_turn_tool_calls_share_the_prefix(proxy: ProxyProcess) -> None:
    with proxy.grpc() as control:
        episode = control.start_episode("tools")
        agent = proxy.agent(session=episode.session_id)
        messages: list[Any] = list(MESSAGES)
        first = chat(
            agent,
            model=MODEL_NAME,
            messages=messages,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            max_tokens=60,
        )
        calls = first.choices[0].message.tool_calls
        assert calls, "named tool_choice must yield a tool call"
        messages.append(first.choices[0].message.model_dump(exclude_none=True))
        messages.append({"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"})
        second = chat(
            agent,
            model=MODEL_NAME,
            messages=messages,
            tools=[WEATHER_TOOL],
            max_tokens=8,
        )
        assert second.choices[0].finish_reason in {"length", "stop", "tool_calls"}
        control.finish_episode(episode.episode_id, {"reward": 1.0})
    (tree,) = pull_all(proxy, 1)
    turn1, turn2 = tree.calls
    shared = 0
    for a, b in zip(path_tokens(tree, 0), path_tokens(tree, 1), strict=False):
        if a != b:
            break
        shared += 1
    # The second prompt re-sends the first (system + tools + user + assistant header) at
    # least; vLLM's rendering of the tool call may re-tokenise differently, which the tree
    # shows as a branch rather than hiding.
    assert shared >= turn1.prompt_length
    assert turn2.prompt_length > turn1.prompt_length + turn1.completion_length // 2
    assert tree.unique_tokens < tree.flat_tokens
    assert tree.unique_tokens == sum(len(s.token_ids) for n in tree.nodes for s in n.segments)


# -- weight updates -------------------------------------------------------------------------


def test_weight_update_mid_traffic_holds_then_answers_with_right_versions(
    vllm: Vllm, proxy: ProxyProcess
) -> None:
    control = proxy.grpc()
    episode = control.start_episode("update")
    agent = proxy.agent(api_key=episode.api_key)

    def ask(tag: str) -> tuple[str, float]:
        chat(agent, model=MODEL_NAME, messages=[{"role": "user", "content": tag}], max_tokens=6)
        return tag, time.monotonic()

    ask("before")
    paused = control.pause()
    assert paused.paused
    assert httpx.get(f"{vllm.url}/is_paused").json() == {"is_paused": True}
    with ThreadPoolExecutor(4) as pool:
        held = [pool.submit(ask, f"held-{i}") for i in range(3)]
        time.sleep(1.0)
        assert not any(f.done() for f in held), "requests must wait while paused"
        assert control.status().held_requests == 3
        control.set_weight_version(1)
        resumed_at = time.monotonic()
        control.resume()
        answered = [f.result(timeout=60) for f in held]
    assert all(t >= resumed_at for _, t in answered)
    # The full protocol, with a real reload from disk, while streams are running.
    with ThreadPoolExecutor(4) as pool:
        streams = [
            pool.submit(
                lambda: chat_stream(agent, model=MODEL_NAME, messages=MESSAGES, max_tokens=64)
            )
            for _ in range(3)
        ]
        time.sleep(0.2)
        update = control.update_weights(2, step_timeout=60)
        assert update.ok, [s.error for s in update.steps if not s.ok]
        assert [s.step for s in update.steps] == [
            "pause",
            "reload_weights",
            "reset_prefix_cache",  # running requests included: they resume on new KV
            "update_weight_version",
            "resume",
        ]
        for stream in streams:
            assert stream.result(timeout=60)[-1].choices[0].finish_reason is not None
    ask("after")
    assert httpx.get(f"{vllm.url}/weight_info").json() == {"weight_version": "2"}
    control.finish_episode(episode.episode_id)
    status = control.status()
    assert (status.weight_version, status.paused, status.held_requests) == (2, False, 0)
    assert status.paused_seconds_total >= 1.0
    control.close()
    (tree,) = pull_all(proxy, 1)
    versions = [(c.weight_version_first, c.weight_version_last) for c in tree.calls]
    assert versions[0] == (0, 0)  # before
    assert versions[1:4] == [(1, 1)] * 3  # held through the pause, answered under version 1
    assert all(1 <= first <= last <= 2 for first, last in versions[4:7])  # spanned the update
    assert versions[7] == (2, 2)  # after
    assert tree.policy_version == 2
    sampled = [
        s for n in tree.nodes for s in n.segments if s.source == trajectory_pb2.TOKEN_SOURCE_SAMPLED
    ]
    assert {s.on_policy for s in sampled} == {True, False}
    assert all(s.staleness == 2 - s.weight_version for s in sampled)
    # Restore version 0 semantics for later tests: versions only grow, so keep going up.


# -- durability -----------------------------------------------------------------------------


def test_kill_9_under_load_loses_no_acknowledged_call(
    vllm: Vllm, start_proxy: ProxyFactory
) -> None:
    proxy = start_proxy(vllm.url)
    with proxy.grpc() as control:
        episodes = [control.start_episode(f"crash-{i}") for i in range(4)]
    acknowledged: dict[str, list[list[int]]] = {e.episode_id: [] for e in episodes}
    stop = threading.Event()
    lock = threading.Lock()

    def agent_loop(episode_id: str, api_key: str, stream: bool) -> None:
        agent = proxy.agent(api_key=api_key)
        turn = 0
        while not stop.is_set():
            turn += 1
            messages = [{"role": "user", "content": f"{episode_id} turn {turn}"}]
            try:
                if stream:
                    ids: list[int] = []
                    prompt: list[int] = []
                    chunks = chat_stream(
                        agent, model=MODEL_NAME, messages=messages, max_tokens=8,
                        extra_body={"return_token_ids": True},
                    )  # fmt: skip
                    for chunk in chunks:
                        prompt = (chunk.model_extra or {}).get("prompt_token_ids") or prompt
                        for c in chunk.choices:
                            ids += (c.model_extra or {}).get("token_ids") or []
                    sequence = prompt + ids
                else:
                    whole = chat(agent, model=MODEL_NAME, messages=messages, max_tokens=8,
                        extra_body={"return_token_ids": True},
                    )  # fmt: skip
                    sequence = (whole.model_extra or {})["prompt_token_ids"] + (
                        whole.choices[0].model_extra or {}
                    )["token_ids"]
            except (openai.APIError, httpx.HTTPError):
                return  # the proxy died under us: this call was never acknowledged
            with lock:
                acknowledged[episode_id].append(sequence)

    threads = [
        threading.Thread(target=agent_loop, args=(e.episode_id, e.api_key, i % 2 == 1))
        for i, e in enumerate(episodes)
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while sum(map(len, acknowledged.values())) < 24 and time.monotonic() < deadline:
        time.sleep(0.05)
    proxy.kill9()
    stop.set()
    for t in threads:
        t.join(30)
    total = sum(map(len, acknowledged.values()))
    assert total >= 24

    restarted = start_proxy(vllm.url, wal_dir=proxy.wal_dir)
    with restarted.grpc() as control:
        assert control.status().in_flight_episodes == 4
        survivor = restarted.agent(api_key=episodes[0].api_key)  # keys survive the restart
        chat(survivor, model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
        for e in episodes:
            control.finish_episode(e.episode_id)
    trees = {t.episode_id: t for t in pull_all(restarted, 4)}
    for episode_id, sequences in acknowledged.items():
        tree = trees[episode_id]
        recorded = [path_tokens(tree, i) for i in range(len(tree.calls))]
        missing = [s for s in sequences if s not in recorded]
        assert not missing, f"{len(missing)} acknowledged calls of {episode_id} lost"
    # Acknowledged trees are gone for good: a third start finds nothing to serve.
    restarted.stop()
    third = start_proxy(vllm.url, wal_dir=proxy.wal_dir)
    with third.grpc() as control:
        status = control.status()
    assert (status.ready_trajectories, status.in_flight_episodes) == (0, 0)


# -- bad input ------------------------------------------------------------------------------


def test_bad_input_gets_clear_errors_and_the_proxy_survives(
    vllm: Vllm, start_proxy: ProxyFactory
) -> None:
    proxy = start_proxy(vllm.url, extra=("--max-body-bytes", str(1 << 20)))
    with proxy.grpc() as control:
        episode = control.start_episode("bad")
    chat_url = f"{proxy.url}/v1/chat/completions"
    session = {"X-Trieflow-Session": episode.session_id}

    def post(body: bytes | dict[str, Any], headers: dict[str, str] | None = None) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.post(
            chat_url, content=content, headers=session if headers is None else headers, timeout=30
        )

    cases: list[tuple[bytes | dict[str, Any], int, str]] = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"model": MODEL_NAME, "messages": "hi"}, 400, "'messages'"),
        ({"model": MODEL_NAME, "messages": MESSAGES, "logprobs": "yes"}, 400, "'logprobs'"),
        ({"model": MODEL_NAME, "messages": MESSAGES, "n": "2"}, 400, "'n'"),
        (b'{"model": "tiny", "messages": [], "pad": "' + b"x" * (2 << 20) + b'"}', 413, "exceeds"),
    ]
    for body, status, text in cases:
        response = post(body)
        assert response.status_code == status, response.text
        assert text in response.json()["error"]["message"]
    # vLLM's own validation errors come back as vLLM wrote them.
    invalid = post({"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": -1})
    direct = httpx.post(
        f"{vllm.url}/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": -1},
    )
    assert (invalid.status_code, invalid.json()) == (direct.status_code, direct.json())
    unknown = post({"model": MODEL_NAME, "messages": MESSAGES}, {"X-Trieflow-Session": "nobody"})
    assert unknown.status_code == 404
    assert "unknown session" in unknown.json()["error"]["message"]
    anonymous = post({"model": MODEL_NAME, "messages": MESSAGES}, {})
    assert anonymous.status_code == 401
    with pytest.raises(openai.NotFoundError):
        chat(proxy.agent(session="nobody"), model=MODEL_NAME, messages=MESSAGES)
    with proxy.grpc() as control, pytest.raises(grpc.RpcError) as info:
        control.finish_episode("no-such-episode")
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    # Still serving, and the good call records normally.
    good = post({"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 3})
    assert good.status_code == 200
    assert proxy.alive()
    metrics = httpx.get(f"{proxy.admin_url}/metrics").text
    # Five refused by the proxy, one by vLLM (relayed).
    assert 'trieflow_proxy_requests_total{route="/v1/chat/completions",status="400"} 6.0' in metrics
    assert 'trieflow_proxy_requests_total{route="/v1/chat/completions",status="413"} 1.0' in metrics
    assert 'trieflow_proxy_requests_total{route="/v1/chat/completions",status="200"} 1.0' in metrics


def test_upstream_down_is_a_502_and_failover_finds_a_live_replica(
    vllm: Vllm, start_proxy: ProxyFactory
) -> None:
    # Bound but never listening: connections are refused, and no other server (a proxy
    # started below, say) can be handed this port while the test runs.
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{holder.getsockname()[1]}"
        only_dead = start_proxy(dead, extra=("--allow-unrecorded",))
        response = httpx.post(
            f"{only_dead.url}/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": MESSAGES},
            timeout=30,
        )
        assert response.status_code == 502
        assert "no upstream replica reachable" in response.json()["error"]["message"]
        assert only_dead.alive()

        both = start_proxy(dead, vllm.url)
        with both.grpc() as control:
            sessions = [control.start_episode(f"fo-{i}") for i in range(4)]
            for s in sessions:  # some sessions prefer the dead replica; all must be answered
                agent = both.agent(session=s.session_id)
                chat(agent, model=MODEL_NAME, messages=MESSAGES, max_tokens=2)
            replicas = {r.url: r.healthy for r in control.status().replicas}
    assert replicas == {dead: False, vllm.url: True}
    metrics = httpx.get(f"{both.admin_url}/metrics").text
    assert "trieflow_proxy_failovers_total 0.0" not in metrics


def test_metrics_cover_requests_tokens_trees_and_pauses(proxy: ProxyProcess) -> None:
    with proxy.grpc() as control:
        episode = control.start_episode("metrics")
        agent = proxy.agent(api_key=episode.api_key)
        for _ in range(2):
            chat(agent, model=MODEL_NAME, messages=MESSAGES, max_tokens=4)
        control.finish_episode(episode.episode_id)
    text = httpx.get(f"{proxy.admin_url}/metrics").text
    values = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert values['trieflow_proxy_requests_total{route="/v1/chat/completions",status="200"}'] == 2
    assert values['trieflow_proxy_tokens_captured_total{kind="completion"}'] == 8
    assert values['trieflow_proxy_added_latency_seconds_count{route="/v1/chat/completions"}'] == 2
    assert values["trieflow_proxy_tree_dedup_ratio_count"] == 1
    assert values['trieflow_proxy_trajectories{state="ready"}'] == 1
    assert values['trieflow_proxy_trajectories_finished_total{outcome="completed"}'] == 1
    assert "trieflow_proxy_paused_seconds_total" in values
    assert values["trieflow_proxy_wal_bytes"] > 0
