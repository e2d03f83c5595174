"""Key epochs over HTTP: rotation under load, the overlap, replays, stale keys, early rotation
when the replay cache is full, time-based rotation, and what /metrics says about them."""

from __future__ import annotations

import asyncio

from server_support import CONFIDENTIAL_CHAT, SSE, GatedEcho, chat_body, wait_for
from prometheus_client.parser import text_string_to_metric_families

from node.crypto import b64d


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def post_and_open(node, outer, opener):
    """Post a sealed request; open a 200 answer (JSON or stream) -> (status, receipt | error)."""
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    if response.status != 200:
        return response.status, (await response.json())["error"]
    if response.headers["Content-Type"].startswith("text/event-stream"):
        for event in SSE.parse(await response.read()).events:
            opener.open_event(event)
        return 200, opener.finish()
    opener.open_response(await response.json())
    return 200, opener.receipt


async def test_rotation_under_concurrent_load_loses_no_request(node_client):
    """Each round seals its requests to the current key, then the key rotates while they are in
    flight: every request, sealed to the current or the previous key, is answered."""
    keyring = node_client.state.keyring
    results = []
    for round_ in range(8):
        epoch = keyring.current.epoch
        sealed = [node_client.seal(chat_body(f"round {round_} request {i}", stream=i % 3 == 0)) for i in range(16)]
        tasks = [asyncio.ensure_future(post_and_open(node_client, outer, opener)) for outer, opener in sealed]
        await asyncio.sleep(0)  # some requests are on their way ...
        keyring.rotate()  # ... when the key changes
        for status, receipt in await asyncio.gather(*tasks):
            assert status == 200, receipt
            assert receipt["key_epoch"] == epoch
            results.append(receipt)
    assert len(results) == 128
    assert keyring.current.epoch == 9


async def test_stream_in_flight_survives_many_rotations(make_node):
    engine = GatedEcho()
    node = await make_node(engine, keys={"overlap": 0})
    engine.gate.clear()
    outer, opener = node.seal(chat_body("long lived stream", stream=True))
    epoch = node.state.keyring.current.epoch
    response = await node.post(CONFIDENTIAL_CHAT, outer)
    assert response.status == 200
    for _ in range(3):
        node.state.keyring.rotate()
    node.state.keyring.maintain()  # overlap 0: the stream's key is retired
    engine.gate.set()
    for event in SSE.parse(await response.read()).events:
        opener.open_event(event)
    assert opener.finish()["key_epoch"] == epoch


async def test_previous_key_live_during_overlap_only(make_node):
    node = await make_node(keys={"overlap": 3600})
    outer, opener = node.seal(chat_body("sealed before rotation"))
    node.state.keyring.rotate()
    status, receipt = await post_and_open(node, outer, opener)
    assert status == 200 and receipt["key_epoch"] == 1
    # replays are still refused under the previous key
    assert (await node.post(CONFIDENTIAL_CHAT, outer)).status == 409
    node.state.keyring.rotate()  # epoch 1 is no longer live
    outer, opener = node.seal(chat_body("sealed to epoch 2"))
    node.state.keyring.rotate()
    assert (await post_and_open(node, outer, opener))[0] == 200


async def test_replayed_request_refused(node_client):
    outer, opener = node_client.seal(chat_body("replay me"))
    assert (await post_and_open(node_client, outer, opener))[0] == 200
    for _ in range(3):
        status, error = await post_and_open(node_client, outer, opener)
        assert (status, error["code"]) == (409, "REPLAYED_REQUEST")
    # a stream replayed is refused the same way
    outer, opener = node_client.seal(chat_body("replay a stream", stream=True))
    assert (await post_and_open(node_client, outer, opener))[0] == 200
    assert (await node_client.post(CONFIDENTIAL_CHAT, outer)).status == 409


async def test_replay_after_the_key_retired_is_refused(make_node):
    node = await make_node(keys={"overlap": 0})
    outer, opener = node.seal(chat_body("captured"))
    assert (await post_and_open(node, outer, opener))[0] == 200
    node.state.keyring.rotate()
    status, error = await post_and_open(node, outer, opener)
    assert (status, error["code"]) == (422, "STALE_NODE_KEY")


async def test_stale_key_then_retry_with_the_key_in_the_body(make_node):
    node = await make_node(keys={"overlap": 0})
    old_key = node.current_key
    node.state.keyring.rotate()
    node.state.keyring.rotate()
    outer, opener = node.seal(chat_body("stale then fresh"), node_key=old_key)
    status, error = await post_and_open(node, outer, opener)
    assert (status, error["code"]) == (422, "STALE_NODE_KEY")
    assert error["key_epoch"] == 3
    new_key = b64d(error["node_dh_public_key"])
    assert new_key == node.current_key
    outer, opener = node.seal(chat_body("stale then fresh"), node_key=new_key)
    status, receipt = await post_and_open(node, outer, opener)
    assert status == 200 and receipt["key_epoch"] == 3


async def test_early_rotation_when_replay_cache_full(make_node):
    node = await make_node(keys={"replay_capacity": 3})
    keyring = node.state.keyring
    first_key = node.current_key
    accepted = []
    for i in range(3):
        outer, opener = node.seal(chat_body(f"fill {i}"))
        assert (await post_and_open(node, outer, opener))[0] == 200
        accepted.append(outer)
    assert keyring.current.epoch == 2  # rotated when the third request filled the cache
    assert node.current_key != first_key
    # the full key takes nothing more: new requests and replays get the current key
    outer, opener = node.seal(chat_body("one more"), node_key=first_key)
    status, error = await post_and_open(node, outer, opener)
    assert (status, error["code"]) == (422, "STALE_NODE_KEY")
    assert b64d(error["node_dh_public_key"]) == node.current_key
    for outer in accepted:
        response = await node.post(CONFIDENTIAL_CHAT, outer)
        assert response.status == 422
    # the new key works and fills in turn
    for i in range(3):
        outer, opener = node.seal(chat_body(f"second epoch {i}"))
        assert (await post_and_open(node, outer, opener))[1]["key_epoch"] == 2
    assert keyring.current.epoch == 3
    metrics = metric_samples(await (await node.client.get("/metrics")).text())
    assert metrics[("tee_node_key_epoch", ())] == 3
    assert metrics[("tee_node_key_rotations_total", ())] == 2


async def test_time_based_rotation(make_node):
    node = await make_node(keys={"rotation_interval": 0.2, "overlap": 0.1})
    first_key = node.current_key

    async def epoch() -> int:
        return (await (await node.client.get("/ready")).json())["key_epoch"]

    # the maintenance task rotates with no request arriving
    await wait_for(lambda: node.state.keyring.current.epoch >= 3, what="two rotations")
    assert await epoch() >= 3
    outer, opener = node.seal(chat_body("sealed to epoch 1"), node_key=first_key)
    status, error = await post_and_open(node, outer, opener)
    assert (status, error["code"]) == (422, "STALE_NODE_KEY")
    # a client that retries with the key from the body gets through (rotation may race it once more)
    for _ in range(5):
        outer, opener = node.seal(chat_body("fresh"), node_key=b64d(error["node_dh_public_key"]))
        status, error = await post_and_open(node, outer, opener)
        if status == 200:
            break
    assert status == 200


async def test_metrics_counts_epochs_refusals_routes_and_ttft(node_client):
    node = node_client
    outer, opener = node.seal(chat_body("count me"))
    await post_and_open(node, outer, opener)
    await post_and_open(node, outer, opener)  # replay
    await post_and_open(node, outer, opener)  # replay
    stale, _ = node.seal(chat_body("stale"), node_key=bytes(range(32)))
    assert (await node.post(CONFIDENTIAL_CHAT, stale)).status == 422
    outer, opener = node.seal(chat_body("a streamed one", stream=True))
    assert (await post_and_open(node, outer, opener))[0] == 200
    assert (await node.post(CONFIDENTIAL_CHAT, b"{")).status == 400
    node.state.keyring.rotate()

    metrics = metric_samples(await (await node.client.get("/metrics")).text())
    route = ("route", CONFIDENTIAL_CHAT)
    assert metrics[("tee_node_key_epoch", ())] == 2
    assert metrics[("tee_node_key_rotations_total", ())] == 1
    assert metrics[("tee_node_refusals_total", (("reason", "replay"),))] == 2
    assert metrics[("tee_node_refusals_total", (("reason", "stale_key"),))] == 1
    assert metrics[("tee_node_requests_total", (route, ("status", "200")))] == 2
    assert metrics[("tee_node_requests_total", (route, ("status", "409")))] == 2
    assert metrics[("tee_node_requests_total", (route, ("status", "422")))] == 1
    assert metrics[("tee_node_requests_total", (route, ("status", "400")))] == 1
    assert metrics[("tee_node_time_to_first_token_seconds_count", (route,))] == 1
    assert metrics[("tee_node_time_to_first_token_seconds_bucket", (("le", "+Inf"), route))] == 1
    assert metrics[("tee_node_tokens_total", (("kind", "completion"),))] == 2 + 3
    assert metrics[("tee_node_stream_events_total", ())] == 4
    assert metrics[("tee_node_request_duration_seconds_count", (route,))] == 6


async def test_concurrent_replays_one_wins(node_client):
    outer, opener = node_client.seal(chat_body("raced copies", stream=True))
    responses = await asyncio.gather(*(node_client.post(CONFIDENTIAL_CHAT, outer) for _ in range(12)))
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] + [409] * 11
    (winner,) = [r for r in responses if r.status == 200]
    for event in SSE.parse(await winner.read()).events:
        opener.open_event(event)
    opener.finish()
    for response in responses:
        response.close()
