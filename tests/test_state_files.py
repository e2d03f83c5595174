"""The simulated TEE's seed file: atomic creation, no symlinks, owner-only permissions, and a
damaged file reported with its path and what to do."""

from __future__ import annotations

import os

import pytest

from attestation.producers import simulated
from attestation.errors import AttestationUnavailable
from attestation.producers.simulated import SEED_FILE, SEED_SIZE, load_or_create_seed
from node.cli import EXIT_CANNOT_START, main


def test_created_once_owner_only_and_nothing_left_behind(tmp_path):
    state = tmp_path / "state"
    seed = load_or_create_seed(state)
    path = state / SEED_FILE
    assert len(seed) == SEED_SIZE and path.read_bytes() == seed
    assert path.stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700
    assert [p.name for p in state.iterdir()] == [SEED_FILE]
    assert load_or_create_seed(state) == seed  # the same root of trust after a restart


def test_a_crash_before_the_rename_leaves_no_seed(tmp_path, monkeypatch):
    """A crash between writing and publishing the seed leaves no (short) seed file: the next
    start makes a fresh one instead of refusing a damaged file."""

    def crash(src, dst):
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(simulated.os, "link", crash)
    with pytest.raises(KeyboardInterrupt):
        load_or_create_seed(tmp_path)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert len(load_or_create_seed(tmp_path)) == SEED_SIZE


def test_a_concurrent_creator_wins_and_both_read_its_seed(tmp_path, monkeypatch):
    theirs = bytes(range(SEED_SIZE))
    real_link = os.link

    def link_after_another_node(src, dst):
        with open(dst, "xb") as other:  # another node published its seed first
            other.write(theirs)
        os.chmod(dst, 0o600)
        real_link(src, dst)

    monkeypatch.setattr(simulated.os, "link", link_after_another_node)
    assert load_or_create_seed(tmp_path) == theirs
    assert [p.name for p in tmp_path.iterdir()] == [SEED_FILE]


def test_symlink_is_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(os.urandom(SEED_SIZE))
    target.chmod(0o600)
    state = tmp_path / "state"
    state.mkdir()
    (state / SEED_FILE).symlink_to(target)
    with pytest.raises(AttestationUnavailable, match="symbolic link") as info:
        load_or_create_seed(state)
    assert str(state / SEED_FILE) in str(info.value) and "attestation.state_dir" in str(info.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660])
def test_group_or_other_access_is_refused(tmp_path, mode):
    load_or_create_seed(tmp_path)
    path = tmp_path / SEED_FILE
    path.chmod(mode)
    with pytest.raises(AttestationUnavailable) as info:
        load_or_create_seed(tmp_path)
    message = str(info.value)
    assert f"mode {mode:04o}" in message and f"chmod 600 {path}" in message


@pytest.mark.parametrize("content", [b"", b"short", os.urandom(SEED_SIZE + 1)], ids=["empty", "short", "long"])
def test_damaged_file_is_reported_with_path_and_remedy(tmp_path, content):
    path = tmp_path / SEED_FILE
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(AttestationUnavailable) as info:
        load_or_create_seed(tmp_path)
    message = str(info.value)
    assert str(path) in message and "damaged" in message and "delete it" in message


def test_not_a_regular_file(tmp_path):
    (tmp_path / SEED_FILE).mkdir(mode=0o700)
    with pytest.raises(AttestationUnavailable, match="not a regular file"):
        load_or_create_seed(tmp_path)


def test_serve_refuses_to_start_and_says_why(tmp_path, monkeypatch, capfd):
    path = tmp_path / SEED_FILE
    path.write_bytes(b"cut")
    path.chmod(0o600)
    monkeypatch.setenv("TEE_NODE_ATTESTATION__STATE_DIR", str(tmp_path))
    assert main(["serve", "--engine", "echo", "--port", "0"]) == EXIT_CANNOT_START
    err = capfd.readouterr().err
    assert err.startswith("tee-node serve: cannot start: ") and str(path) in err and "damaged" in err
