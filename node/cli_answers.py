"""What `tee-node chat` prints and sends, shared by the one-shot chat (`node.cli_client`) and the
interactive session (`node.cli_chat`): the verified identity, the model choice, one verified
reply, the receipt line, failures. Neither CLI module imports the other's internals.
"""

from __future__ import annotations

import argparse
from typing import Any, TextIO

EXIT_OK = 0
EXIT_FAILED = 1


def identity_lines(identity: Any) -> list[str]:
    kind = "SIMULATED, not a TEE" if identity.simulated else "hardware TEE"
    lines = [
        f"attestation verified: tee={identity.tee} ({kind})",
        f"  measurement:   {identity.measurement}",
        f"  key epoch:     {identity.key_epoch}",
        f"  config digest: {identity.config_digest}",
    ]
    if identity.tcb_status:
        lines.append(f"  TCB status:    {identity.tcb_status}")
    if identity.release:
        release, source = identity.release, identity.release["source"]
        lines.append(
            f"  release:       {release['version']} from {source.get('repository')} at {source.get('commit')}, "
            f"signed by {release['identity']}, log index {release['log_index']}"
        )
    if identity.tls_cert_sha256:
        lines.append(f"  TLS cert:      sha256 {identity.tls_cert_sha256.hex()} (attested, pinned)")
    lines.extend(f"  note:          {note}" for note in identity.notes)
    return lines


def report_failure(err: TextIO, exc: BaseException, partial: bool = False) -> int:
    if partial:
        err.write("\n")
    from attestation.errors import PolicyRefused

    if isinstance(exc, PolicyRefused):  # one line per refused claim
        err.write("error: PolicyRefused: the node's attestation is authentic but the policy refuses it:\n")
        err.writelines(f"  - {line}\n" for line in exc.errors)
    else:
        err.write(f"error: {type(exc).__name__}: {exc}\n")
    if partial:
        err.write("the text above did not verify and must not be trusted\n")
    return EXIT_FAILED


def sampling_params(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if args.max_tokens is not None:
        params["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        params["temperature"] = args.temperature
    return params


def attest_and_choose_model(client: Any, requested: str | None, err: TextIO, task: str = "chat") -> str | None:
    """Attest the node first (nothing else is sent to a node not yet verified), then choose the
    requested model if the node serves it for `task` ("chat" or "images"), else the node's first
    such model, and say on `err` what was verified, the model last. None (said on `err`, with
    what the node serves) when no model fits."""
    identity = client.attest()
    # A node lists each model's `tasks`; one that does not (another server) may serve any.
    served = [card.id for card in client.models.list().data if task in (getattr(card, "tasks", None) or [task])]
    kind = {"chat": "chat", "images": "image"}.get(task, task)
    if not served:
        err.write(f"error: the node serves no {kind} model\n")
        return None
    if requested is not None and requested not in served:
        err.write(f"error: the node does not serve {kind} model {requested!r}; its {kind} models: {', '.join(served)}\n")
        return None
    model = requested or served[0]
    for line in identity_lines(identity):
        err.write(line + "\n")
    err.write(f"  model:         {model}\n")
    err.write(f"  key exchange:  {client.key_exchange}\n")
    err.write("  length hiding: request and answer padded\n")
    err.flush()
    return model


class AnswerOut:
    """The answer's output stream, remembering whether any answer text reached it (an error
    after that must say the printed text did not verify)."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.printed = False

    def write(self, text: str) -> None:
        self.printed = self.printed or bool(text.strip())
        self._out.write(text)

    def flush(self) -> None:
        self._out.flush()


def reply(client: Any, model: str, messages: list[dict[str, Any]], params: dict[str, Any], stream: bool, out: AnswerOut) -> tuple[str, Any]:
    """Send one verified chat request and print its answer: (text, the verified answer, whose
    `receipt` and `usage` are read by `receipt_line`). The receipt is verified before this
    returns; an exception means the printed text must be discarded."""
    if not stream:
        response = client.chat.completions.create(model=model, messages=messages, stream=False, **params)
        text = response.choices[0].message.content or ""
        out.write(text + "\n")
        out.flush()
        return text, response
    parts: list[str] = []
    answer = client.chat.completions.create(model=model, messages=messages, stream=True, **params)
    for chunk in answer:
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
                out.write(choice.delta.content)
                out.flush()
    out.write("\n")
    out.flush()
    return "".join(parts), answer


def receipt_line(answer: Any) -> str:
    receipt = answer.receipt
    # The exact usage inside the answer (the signed one in clear may be rounded up: privacy.clear_usage).
    usage = answer.usage or receipt.usage
    tokens = f", tokens prompt={usage.prompt_tokens} completion={usage.completion_tokens}" if usage else ""
    return f"receipt verified: events={receipt.events}, key epoch={receipt.key_epoch}, signed by the attested key{tokens}\n"
