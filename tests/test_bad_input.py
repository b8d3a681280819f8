"""Bad input (issue 9, fault 7): a clear error, and nothing created, nothing started.

Each case once ran away (memory, hundreds of thousands of folders, a crash
after 39 s), started rank 0 before failing, or ended in a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING, Any

import pytest

import corral
from corral._config import MAX_NPROCS

from .conftest import python

if TYPE_CHECKING:
    from pathlib import Path


def _corral_cli(*argv: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "corral", "run", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


@pytest.mark.parametrize("nprocs", [2**63, 10**6, MAX_NPROCS + 1])
def test_too_many_ranks_is_refused_before_anything_is_made(tmp_path: Path, nprocs: int) -> None:
    """A rank count past the documented bound is a ConfigError naming it; no folder made."""
    log_dir = tmp_path / "logs"
    with pytest.raises(corral.ConfigError, match=f"limit of {MAX_NPROCS} ranks"):
        corral.spawn(python("pass"), nprocs=nprocs, log_dir=log_dir)
    assert not log_dir.exists()


def test_too_many_ranks_by_mapping(tmp_path: Path) -> None:
    """The bound holds when the count comes from a per-rank mapping too."""
    envs: dict[int, dict[str, str]] = {rank: {} for rank in range(MAX_NPROCS + 1)}
    with pytest.raises(corral.ConfigError, match="limit of"):
        corral.spawn(python("pass"), envs=envs, log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("log_dir", "message"),
    [
        ("", "empty path"),
        ("logs\0x", "NUL"),
        ("a_file/sub", "Not a directory"),
    ],
)
def test_bad_log_dirs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_dir: str, message: str
) -> None:
    """An empty path (it used to mean the current folder), a NUL byte, a path below a file."""
    (tmp_path / "a_file").write_text("")
    before = sorted(p.name for p in tmp_path.iterdir())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(corral.ConfigError, match=message):
        corral.spawn(python("pass"), nprocs=2, log_dir=log_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root enters every folder")
def test_log_dir_under_a_folder_that_cannot_be_entered(tmp_path: Path) -> None:
    """A folder the user cannot enter: a ConfigError, not a raw PermissionError."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0)
    try:
        with pytest.raises(corral.ConfigError, match="log_dir"):
            corral.spawn(python("pass"), nprocs=1, log_dir=locked / "logs")
    finally:
        locked.chmod(0o700)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux execve limits")
def test_an_environment_the_kernel_would_refuse(tmp_path: Path) -> None:
    """One rank's variable over the kernel's per-string limit: a ConfigError naming the
    rank and the variable, before any rank starts, and the folders made are gone."""
    log_dir = tmp_path / "new" / "logs"
    envs = {0: {}, 1: {"HUGE": "x" * 200_000}}
    with pytest.raises(corral.ConfigError, match="rank 1: environment variable HUGE"):
        corral.spawn(python("pass"), envs=envs, log_dir=log_dir)
    assert list(tmp_path.iterdir()) == []


def test_an_environment_over_arg_max(tmp_path: Path) -> None:
    """Many variables that together exceed ARG_MAX: named, before anything starts."""
    limit = os.sysconf("SC_ARG_MAX")
    env = {f"V{i}": "x" * 100_000 for i in range(limit // 100_000 + 2)}
    with pytest.raises(corral.ConfigError, match=r"rank 0: .*ARG_MAX"):
        corral.spawn(python("pass"), nprocs=1, env=env, log_dir=tmp_path / "logs")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-n", "99999999999999999999999"], "limit of"),
        (["-n", "1000000"], "limit of"),
        (["--tee-ranks", "0-100000000"], "beyond corral's limit"),
    ],
)
def test_cli_refuses_runaway_counts_at_once(tmp_path: Path, argv: list[str], message: str) -> None:
    """The CLI's rank counts and rank ranges are bounded before anything is expanded."""
    res = _corral_cli(*argv, "--log-dir", str(tmp_path / "logs"), "--", "/bin/true")
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr
    assert not (tmp_path / "logs").exists()


def test_cli_with_stdout_closed(tmp_path: Path) -> None:
    """``corral run ... >&-``: the tee to stdout is disabled with a warning, the run and
    its logs go on, no traceback."""
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "corral",
            "run",
            "--log-dir",
            str(tmp_path),
            "--",
            "/bin/echo",
            "hi",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=False,
        preexec_fn=lambda: os.close(1),
    )
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert "tee to stdout disabled" in res.stderr
    assert (tmp_path / "0" / "stdout.log").read_text() == "hi\n"
