"""Code tests of the search lock: one live process per search, a dead one's lock taken over."""

import os
import socket
import subprocess
import sys

import pytest

from search.locking import LOCK_FILE, LockedError, holding


def test_a_second_holder_is_refused_naming_the_process_and_the_lock_goes_with_the_block(tmp_path):
    with holding(tmp_path, "abc123") as path:
        assert path.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(LockedError, match=rf"search run abc123 is already running in process {os.getpid()} on "):
            with holding(tmp_path, "abc123"):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    with holding(tmp_path, "abc123"):  # free again
        pass


def test_a_lock_left_by_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    (tmp_path / LOCK_FILE).write_text(f"{dead.stdout.strip()} {socket.gethostname()}\n")  # that process has exited
    with holding(tmp_path, "abc123") as path:
        assert path.read_text().split()[0] == str(os.getpid())


def test_a_lock_held_on_another_host_counts_as_held(tmp_path):
    (tmp_path / LOCK_FILE).write_text("1 another-host\n")
    with pytest.raises(LockedError, match="in process 1 on another-host"):
        with holding(tmp_path, "abc123"):
            pass
