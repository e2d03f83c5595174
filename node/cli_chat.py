"""`tee-node chat URL` without a prompt: an interactive session with an attested node.

The node is attested once, before the first turn. Every turn is its own verified confidential
request carrying the whole conversation so far; an answer joins the conversation only once its
receipt verified. `/exit`, Ctrl-D (end of input) and Ctrl-C end the session with status 0; a
failed verification ends it with status 1, the unverified text flagged as such.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from .cli_answers import EXIT_FAILED, EXIT_OK, AnswerOut, attest_and_choose_model, receipt_line, reply, report_failure, sampling_params

PROMPT = "you> "
EXIT_COMMAND = "/exit"


def _read_turn(out: TextIO) -> str | None:
    """The next user message; None when the user ends the session."""
    while True:
        try:
            # input() writes the prompt itself, and line editing comes with readline when present.
            line = input(PROMPT) if out is sys.stdout else _prompted_line(out)
        except EOFError:
            out.write("\n")
            return None
        text = line.strip()
        if text == EXIT_COMMAND:
            return None
        if text:
            return text


def _prompted_line(out: TextIO) -> str:
    out.write(PROMPT)
    out.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line


def run_session(args: argparse.Namespace, client_kwargs: dict[str, Any], out: TextIO, err: TextIO) -> int:
    from attestation.errors import AttestationError

    from .client import Client, TeeNodeError

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    messages: list[dict[str, Any]] = [{"role": "system", "content": args.system}] if args.system else []
    params = sampling_params(args)
    answer = AnswerOut(out)
    try:
        with Client(args.url, **client_kwargs) as client:
            model = attest_and_choose_model(client, args.model, err)
            if model is None:
                return EXIT_FAILED
            err.write(f"type a message; {EXIT_COMMAND}, Ctrl-D or Ctrl-C ends the session\n")
            err.flush()
            while (text := _read_turn(out)) is not None:
                messages.append({"role": "user", "content": text})
                reply_text, verified = reply(client, model, messages, params, not args.no_stream, answer)
                messages.append({"role": "assistant", "content": reply_text})
                answer.printed = False  # verified: nothing on screen is in doubt
                err.write(receipt_line(verified))
                err.flush()
            return EXIT_OK
    except KeyboardInterrupt:
        if answer.printed:
            err.write("\nstopped: the unfinished answer above did not verify\n")
        else:
            out.write("\n")
        return EXIT_OK
    except (TeeNodeError, AttestationError) as exc:
        return report_failure(err, exc, answer.printed)
