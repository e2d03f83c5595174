"""Schema errors name the offending fields of public bodies (the envelope, a lock request) by path
and error type, never by value; a decrypted body's fields are never named."""

from __future__ import annotations

from server_support import CONFIDENTIAL_CHAT, chat_body, compact

SECRET = "grapefruit-77-value"


async def error_of(response) -> dict:
    assert response.status == 400
    return (await response.json())["error"]


async def test_an_empty_envelope_names_the_missing_fields(node_client) -> None:
    error = await error_of(await node_client.post(CONFIDENTIAL_CHAT, b"{}"))
    assert error["code"] == "INVALID_BODY"
    assert error["message"].startswith(
        "request body does not match the schema: ciphertext (missing), client_dh_public_key (missing), model_name (missing) and "
    )


async def test_a_wrong_field_is_named_and_its_value_is_not(node_client) -> None:
    outer, _ = node_client.seal(chat_body("hello"))
    outer["nonce"] = {"secret": SECRET}
    error = await error_of(await node_client.post(CONFIDENTIAL_CHAT, outer))
    assert error["message"] == "request body does not match the schema: nonce (string_type)"
    assert SECRET not in compact(error).decode()


async def test_a_lock_request_names_its_missing_model(node_client) -> None:
    error = await error_of(await node_client.client.post("/v1/nodes/lock", json={"mode": SECRET}))
    assert error["message"].startswith("request body does not match the schema: model (missing)")
    assert SECRET not in error["message"]


async def test_a_decrypted_body_is_refused_without_naming_its_fields(node_client) -> None:
    outer, _ = node_client.seal({"model": "echo-model", "messages": "not a list", SECRET: 1})
    error = await error_of(await node_client.post(CONFIDENTIAL_CHAT, outer))
    assert error["message"] == "decrypted body is not a valid request for this endpoint"
