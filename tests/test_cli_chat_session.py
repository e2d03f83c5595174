"""`tee-node chat URL` without a prompt, driven through a pseudo-terminal as a person would:
attested once, two verified turns carrying the conversation, ended by Ctrl-D, /exit or Ctrl-C."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import subprocess
import termios
import time

import pytest
from server_support import TEE_NODE

from node.config import EMBEDDED_CHAT_MODEL


class Terminal:
    """A process on a pseudo-terminal: type into it, wait for what it prints."""

    def __init__(self, *args: str) -> None:
        self.master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if not k.startswith("TEE_NODE_")}
        # Its own session with the terminal as controlling tty, so that Ctrl-C raises SIGINT.
        self.proc = subprocess.Popen(
            args, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0),
        )
        os.close(slave)
        self.screen = ""

    def expect(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        """Read until `pattern` appears after what earlier calls consumed."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.screen)
            if match:
                self.screen = self.screen[match.end():]
                return match
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                pytest.fail(f"{pattern!r} not seen; the terminal shows:\n{self.screen}")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return False
        try:
            data = os.read(self.master, 4096)
        except OSError:  # the process closed the terminal
            return False
        self.screen += data.decode(errors="replace").replace("\r\n", "\n")
        return bool(data)

    def answer_prompt(self, text: str) -> None:
        self.expect("you> ")
        # readline writes the prompt before it switches the terminal to raw input, and a key
        # typed during the switch is dropped: type once the switch is done, as a person would.
        deadline = time.monotonic() + 10
        while termios.tcgetattr(self.master)[3] & termios.ICANON:
            if time.monotonic() > deadline:
                pytest.fail(f"the terminal never left line mode; it shows:\n{self.screen}")
            time.sleep(0.01)
        # readline then starts waiting for input: a Ctrl-C whose SIGINT lands before that wait
        # begins is noted but wakes nothing (CPython checks signals only when the wait is
        # interrupted), as no person could type it that fast.
        time.sleep(0.05)
        os.write(self.master, text.encode())

    def exit_code(self, timeout: float = 10.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self._read(0.5)
            pytest.fail(f"still running {timeout:.0f} s later; the terminal shows:\n{self.screen}")
        finally:
            os.close(self.master)


def start_session(node_process) -> Terminal:
    terminal = Terminal(str(TEE_NODE), "chat", node_process.url, "--allow-simulated")
    terminal.expect(r"attestation verified: tee=\S+ \(SIMULATED, not a TEE\)")
    terminal.expect(r"model: +echo-model\n")
    terminal.expect(r"/exit, Ctrl-D or Ctrl-C ends the session\n")
    return terminal


def test_two_verified_turns_carry_the_conversation_and_ctrl_d_ends_the_session(node_process) -> None:
    terminal = start_session(node_process)
    terminal.answer_prompt("alpha beta\r")
    terminal.expect(r"\nalpha beta\n")  # the echo engine answers the last user message
    # Usage counts every message sent: this turn carried one of two words.
    terminal.expect(r"receipt verified: events=\d+, key epoch=1, signed by the attested key, tokens prompt=2 completion=2\n")
    terminal.answer_prompt("gamma\r")
    terminal.expect(r"\ngamma\n")
    # The second turn carried the whole conversation: user (2) + assistant (2) + user (1) words.
    terminal.expect(r"receipt verified: events=\d+, key epoch=1, signed by the attested key, tokens prompt=5 completion=1\n")
    terminal.answer_prompt("\x04")  # Ctrl-D
    assert terminal.exit_code() == 0
    assert terminal.screen.count("attestation verified") == 0  # attested once, before the first turn


@pytest.mark.parametrize("end", ["/exit\r", "\x03"], ids=["/exit", "Ctrl-C"])
def test_exit_and_ctrl_c_end_the_session_cleanly(node_process, end: str) -> None:
    terminal = start_session(node_process)
    terminal.answer_prompt("delta\r")
    terminal.expect(r"receipt verified: .*tokens prompt=1 completion=1\n")
    terminal.answer_prompt(end)
    assert terminal.exit_code() == 0
    assert "Traceback" not in terminal.screen and "error" not in terminal.screen


def test_an_unknown_model_is_refused_before_anything_is_said_verified(node_process) -> None:
    terminal = Terminal(str(TEE_NODE), "chat", node_process.url, "--allow-simulated", "--model", EMBEDDED_CHAT_MODEL)
    terminal.expect(rf"error: the node does not serve chat model '{re.escape(EMBEDDED_CHAT_MODEL)}'; its chat models: echo-model\n")
    assert terminal.exit_code() == 1
    assert "verified" not in terminal.screen
