"""Tests of the output directory's checks: writable before any run opens, a full disk named."""

import errno
import os

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
