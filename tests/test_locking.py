"""Code tests of the search lock: one live process per search, whatever the lock file says."""

import os
import socket
import subprocess
import sys
import time

import pytest

from search.locking import LOCK_FILE, LockedError, holding
from tests.helpers import REPO

HOLD = """
import sys, time
from pathlib import Path
from search.locking import holding
with holding(Path(sys.argv[1]), "abc123"):
    print("held", flush=True)
    time.sleep(60)
"""

RACE = """
import os, sys
from pathlib import Path
from search.locking import LockedError, holding
folder, rounds, won = Path(sys.argv[1]), int(sys.argv[2]), 0
for _ in range(rounds):
    try:
        with holding(folder, "abc123"):
            marker = os.open(folder / "inside", os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fails if the other is inside too
            os.close(marker)
            os.unlink(folder / "inside")
            won += 1
    except LockedError:
        pass
print(won)
"""


def test_a_second_holder_is_refused_naming_the_process_and_the_lock_goes_with_the_block(tmp_path):
    with holding(tmp_path, "abc123") as path:
        assert path.read_text().split() == [str(os.getpid()), socket.gethostname()]
        with pytest.raises(LockedError, match=rf"search run abc123 is already running in process {os.getpid()} on "):
            with holding(tmp_path, "abc123"):
                pass
    assert not (tmp_path / LOCK_FILE).exists()
    with holding(tmp_path, "abc123"):  # free again
        pass


def test_a_lock_held_by_another_live_process_is_refused_and_free_once_it_is_killed(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=rf"in process {holder.pid} on {socket.gethostname()} "):
            with holding(tmp_path, "abc123"):
                pass
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / LOCK_FILE).exists()  # a SIGKILL leaves the file, not the lock
    with holding(tmp_path, "abc123") as path:
        assert path.read_text().split()[0] == str(os.getpid())


@pytest.mark.parametrize("text", ["", "1 another-host\n", "{this process} {this host}\n", "garbage"])
def test_what_a_lock_file_says_without_a_holder_does_not_lock(text, tmp_path):
    """Just created and empty, left by a dead process on another host, or naming this very
    process (a process id reused after a container restarted): no process holds it."""
    text = text.replace("{this process}", str(os.getpid())).replace("{this host}", socket.gethostname())
    (tmp_path / LOCK_FILE).write_text(text)
    with holding(tmp_path, "abc123") as path:
        assert path.read_text().split() == [str(os.getpid()), socket.gethostname()]


def test_two_processes_racing_for_the_lock_500_times_are_never_both_inside(tmp_path):
    rounds, started = 500, time.monotonic()
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACE, str(tmp_path), str(rounds)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [racer.communicate(timeout=120) for racer in racers]
    assert [racer.returncode for racer in racers] == [0, 0], [err[-2000:] for _, err in outputs]
    won = [int(out) for out, _ in outputs]
    assert all(0 < count <= rounds for count in won), won
    print(f"wins {won} of {rounds} each in {time.monotonic() - started:.1f} s")
