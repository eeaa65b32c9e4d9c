"""Tests of the output directory's checks: writable before any run opens, a full disk named."""

import errno
import os
import subprocess
import sys

import pytest

from experiments import ConfigError
from search.outputs import DiskFull, check_writable, naming_a_full_disk


def test_no_space_left_anywhere_in_a_search_is_one_line_naming_the_path_and_the_resume_command(tmp_path):
    with pytest.raises(DiskFull) as full, naming_a_full_disk(tmp_path / "outputs" / "abc", "abc"):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "outputs" / "abc" / "trials.csv"))
    assert str(full.value) == (
        f"{tmp_path / 'outputs' / 'abc' / 'trials.csv'}: no space left on device; free some, then continue with `python -m search resume abc`"
    )
    with pytest.raises(PermissionError), naming_a_full_disk(tmp_path, "abc"):  # other OS errors pass through
        raise PermissionError(errno.EACCES, "Permission denied")


def test_an_output_directory_that_cannot_be_written_is_a_config_error(tmp_path):
    check_writable(tmp_path / "outputs" / "new")  # made, and written
    assert (tmp_path / "outputs" / "new").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"output_dir .*file/outputs: cannot be written \(Not a directory\)"):
        check_writable(tmp_path / "file" / "outputs")
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "read-only").mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="cannot be written"):
            check_writable(tmp_path / "read-only")


LEFT_HALF_WRITTEN = """
import errno, sys
from search.outputs import quiet_leftovers_of_a_full_disk

class HalfWritten:  # like h5py's file id: closing it writes, and fails, when collected
    def __init__(self, error):
        self.error, self.cycle = error, self
    def __del__(self):
        raise self.error

HalfWritten(OSError(errno.ENOSPC, "No space left on device"))
HalfWritten(RuntimeError("file write failed: error message = 'No space left on device'"))
if sys.argv[1] == "quiet":
    quiet_leftovers_of_a_full_disk()
HalfWritten(ValueError("a different failure"))
print("error: the one line", file=sys.stderr)
"""


@pytest.mark.parametrize("mode", ["quiet", "default"])
def test_after_a_full_disk_only_its_leftovers_reports_are_dropped(mode):
    """What a full disk left half written is collected quietly; any other report still prints."""
    done = subprocess.run([sys.executable, "-c", LEFT_HALF_WRITTEN, mode], capture_output=True, text=True, timeout=60)
    full_disk_reports = done.stderr.count("No space left on device")
    assert full_disk_reports == (0 if mode == "quiet" else 2), done.stderr
    assert "a different failure" in done.stderr
