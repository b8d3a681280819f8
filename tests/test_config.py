"""Bad input raises ConfigError before anything starts, naming what is wrong."""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

import pytest

import corral
from corral import ConfigError, Std

from .conftest import python

if TYPE_CHECKING:
    from pathlib import Path

TRUE = [sys.executable, "-c", "pass"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"nprocs": 0}, "at least 1"),
        ({"nprocs": -2}, "at least 1"),
        ({"nprocs": True}, "must be an int"),
        ({"nprocs": "2"}, "must be an int"),
        ({}, "nprocs is required"),
        ({"nprocs": 2, "args": {0: ["a"]}}, r"missing ranks \[1\]"),
        ({"nprocs": 2, "args": {0: [], 1: [], 2: []}}, r"outside 0..1: \[2\]"),
        ({"args": {0: [], 2: []}}, r"missing ranks \[1\].*outside 0..1: \[2\]"),
        (
            {"nprocs": 2, "envs": {1: {}}},
            r"envs must name exactly ranks 0..1 \(missing ranks \[0\]",
        ),
        ({"args": {0: [], 1: []}, "envs": {0: {}}}, r"envs .*missing ranks \[1\]"),
        ({"nprocs": 1, "args": "abc"}, "must be a sequence"),
        ({"nprocs": 1, "args": [1]}, "must be str or path"),
        ({"nprocs": 1, "env": {"A": 1}}, r"env\['A'\] must be a str"),
        ({"nprocs": 1, "env": {"A=B": "x"}}, "bad variable name"),
        ({"nprocs": 2, "redirects": {2: Std.OUT}}, r"redirects names ranks outside 0..1: 2"),
        ({"nprocs": 2, "tee": {-1: Std.OUT}}, r"tee names ranks outside 0..1: -1"),
        ({"nprocs": 2, "tee": "0:1,5:2"}, r"tee names ranks outside 0..1: 5"),
        ({"nprocs": 2, "tee": "loud"}, "'loud'"),
        ({"nprocs": 2, "redirects": 7}, "not a Std value"),
        ({"nprocs": 2, "tee_ranks": [0, 3]}, r"tee_ranks names ranks outside 0..1: 3"),
        ({"nprocs": 1, "prefix": "{host}"}, "unknown field"),
        ({"nprocs": 1, "prefix": "{rank"}, "bad prefix"),
        ({"nprocs": 1, "prefix": "{0}"}, "unknown field"),
        ({"nprocs": 1, "grace": -1}, "grace must be a finite number >= 0"),
        ({"nprocs": 1, "grace": float("nan")}, "grace must be a finite number"),
        ({"nprocs": 1, "cwd": "/definitely/not/here"}, "not an existing directory"),
    ],
)
def test_bad_arguments_raise_config_error(
    tmp_path: Path, kwargs: dict[str, Any], match: str
) -> None:
    """Each bad argument is a ConfigError with an actionable message; nothing is created."""
    log_dir = tmp_path / "logs"
    with pytest.raises(ConfigError, match=match):
        corral.spawn(TRUE, log_dir=log_dir, **kwargs)
    assert not log_dir.exists()


@pytest.mark.parametrize(
    ("entrypoint", "match"),
    [
        ([], "empty argv"),
        ([sys.executable, 3], "every item must be a str or path"),
        (42, "must be a command"),
        (b"/bin/true", "must be a command"),
        ("", "empty program"),
    ],
)
def test_bad_entrypoints(tmp_path: Path, entrypoint: Any, match: str) -> None:
    """An entrypoint that is neither a command nor a callable is a ConfigError."""
    with pytest.raises(ConfigError, match=match):
        corral.spawn(entrypoint, nprocs=1, log_dir=tmp_path / "logs")


def test_log_dir_that_is_a_file(tmp_path: Path) -> None:
    """A log_dir that is a file is refused before anything starts."""
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ConfigError, match="is not a directory"):
        corral.spawn(TRUE, nprocs=1, log_dir=target)
    assert target.read_text() == "x"


def test_log_dir_that_cannot_be_created(tmp_path: Path) -> None:
    """A log_dir below a file cannot be created: ConfigError naming it."""
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot create log_dir"):
        corral.spawn(TRUE, nprocs=1, log_dir=tmp_path / "file" / "logs")


def test_existing_rank_folder_is_never_overwritten(tmp_path: Path) -> None:
    """A non-empty log_dir is accepted only for rank folders that do not exist yet."""
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "stdout.log").write_text("precious")
    (tmp_path / "notes.txt").write_text("other content")
    with pytest.raises(ConfigError, match="already holds rank folder"):
        corral.spawn(TRUE, nprocs=2, log_dir=tmp_path)
    assert (tmp_path / "1" / "stdout.log").read_text() == "precious"
    assert not (tmp_path / "0").exists()


async def test_an_existing_report_is_never_overwritten(tmp_path: Path) -> None:
    """A log_dir that already holds a report.json (an earlier run's, or the user's own)
    is accepted, as any non-empty folder without these rank folders: the file is kept as
    it was and this run's report goes to report-2.json."""
    (tmp_path / "report.json").write_text("precious")
    result = await corral.run(TRUE, nprocs=1, log_dir=tmp_path)
    assert result.ok
    assert (tmp_path / "report.json").read_text() == "precious"
    report = json.loads((tmp_path / "report-2.json").read_text())
    assert report["ok"] is True


async def test_run_field_numbers_the_runs(tmp_path: Path) -> None:
    """``{run}`` in log_dir: the first number whose folder is new; a failed spawn frees it."""
    template = tmp_path / "exp" / "run-{run}"
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "run-2").write_text("a file in the way")
    folders = []
    for _ in range(3):
        result = await corral.run(TRUE, nprocs=2, log_dir=template, redirects=Std.ALL)
        assert result.ok
        assert result.log_dir is not None
        folders.append(result.log_dir.name)
    assert folders == ["run-1", "run-3", "run-4"]
    with pytest.raises(ConfigError):
        corral.spawn(TRUE, nprocs=2, log_dir=template, tee_ranks=[7])
    assert not (tmp_path / "exp" / "run-5").exists()
    groups = [corral.spawn(TRUE, nprocs=1, log_dir=template) for _ in range(2)]
    assert sorted(g.log_dir.name for g in groups) == ["run-5", "run-6"]


async def test_non_empty_log_dir_with_new_rank_folders(tmp_path: Path) -> None:
    """An existing non-empty folder works when the rank sub-folders are new."""
    (tmp_path / "notes.txt").write_text("other content")
    result = await corral.run(TRUE, nprocs=2, log_dir=tmp_path, redirects=Std.ALL)
    assert result.ok
    assert (tmp_path / "0" / "stdout.log").exists()
    assert (tmp_path / "notes.txt").read_text() == "other content"


async def test_default_log_dir_is_a_kept_temporary_folder() -> None:
    """Without log_dir a fresh folder is made, exposed, and kept after close."""
    group = corral.spawn(python("print('hi')"), nprocs=1, redirects="all")
    async with group:
        result = await group.wait()
    assert result.ok
    assert group.log_dir.is_dir()
    assert (group.log_dir / "0" / "stdout.log").read_bytes() == b"hi\n"
    assert result.log_dir == group.log_dir


async def test_environment_layering(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parent env < rank variables < env < envs[rank]; error-file variables point at error.json."""
    monkeypatch.setenv("CORRAL_TEST_PARENT", "parent")
    monkeypatch.setenv("WORLD_SIZE", "from-parent")
    code = (
        "import os, json; keys = ['CORRAL_TEST_PARENT','RANK','LOCAL_RANK','WORLD_SIZE',"
        "'LOCAL_WORLD_SIZE','CORRAL_RANK','CORRAL_NPROCS','COMMON','MINE',"
        "'CORRAL_ERROR_FILE','TORCHELASTIC_ERROR_FILE'];"
        "print(json.dumps({k: os.environ.get(k) for k in keys}))"
    )
    result = await corral.run(
        python(code),
        nprocs=2,
        env={"COMMON": "common", "MINE": "common"},
        envs={0: {}, 1: {"MINE": "one", "RANK": "overridden"}},
        log_dir=tmp_path,
        redirects=Std.OUT,
    )
    assert result.ok
    import json

    seen = {r: json.loads((tmp_path / str(r) / "stdout.log").read_text()) for r in (0, 1)}
    assert seen[0]["CORRAL_TEST_PARENT"] == "parent"
    assert seen[0]["RANK"] == "0"
    assert seen[0]["LOCAL_RANK"] == "0"
    assert seen[0]["WORLD_SIZE"] == "2"
    assert seen[0]["LOCAL_WORLD_SIZE"] == "2"
    assert seen[0]["CORRAL_RANK"] == "0"
    assert seen[0]["CORRAL_NPROCS"] == "2"
    assert seen[0]["COMMON"] == "common"
    assert seen[0]["MINE"] == "common"
    assert seen[1]["MINE"] == "one"
    assert seen[1]["RANK"] == "overridden"
    for r in (0, 1):
        error_file = str(tmp_path / str(r) / "error.json")
        assert seen[r]["CORRAL_ERROR_FILE"] == error_file
        assert seen[r]["TORCHELASTIC_ERROR_FILE"] == error_file


async def test_per_rank_args_and_nprocs_from_mapping(tmp_path: Path) -> None:
    """nprocs may come from a per-rank args mapping; each rank gets its own argv."""
    result = await corral.run(
        [sys.executable, "-c", "import sys; print(sys.argv[1:])"],
        args={0: ["a"], 1: ["b", "c"]},
        log_dir=tmp_path,
        redirects="out",
    )
    assert result.exit_codes == {0: 0, 1: 0}
    assert (tmp_path / "0" / "stdout.log").read_text() == "['a']\n"
    assert (tmp_path / "1" / "stdout.log").read_text() == "['b', 'c']\n"


async def test_commands_are_not_run_through_a_shell(tmp_path: Path) -> None:
    """Shell syntax in arguments reaches the program verbatim."""
    marker = tmp_path / "pwned"
    result = await corral.run(
        [sys.executable, "-c", "import sys; print(sys.argv[1])"],
        nprocs=1,
        args=[f"$(touch {marker}); `touch {marker}`"],
        log_dir=tmp_path / "logs",
        redirects="out",
    )
    assert result.ok
    assert not marker.exists()
    assert "$(touch" in (tmp_path / "logs" / "0" / "stdout.log").read_text()


async def test_pathlike_entrypoint_and_cwd(tmp_path: Path) -> None:
    """A PathLike entrypoint runs directly; cwd sets the ranks' working directory."""
    script = tmp_path / "prog"
    script.write_text(f"#!{sys.executable}\nimport os\nprint(os.getcwd())\n")
    script.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    result = await corral.run(
        script, nprocs=1, cwd=work, log_dir=tmp_path / "logs", redirects=Std.OUT
    )
    assert result.ok
    assert (tmp_path / "logs" / "0" / "stdout.log").read_text().strip() == os.fspath(work)


def test_an_unknown_keyword_is_named_with_a_suggestion(tmp_path: Path) -> None:
    """spawn/run take exactly SpawnOptions' keywords; a typo is a ConfigError with a hint."""
    with pytest.raises(corral.ConfigError, match=r"'nproc' \(did you mean 'nprocs'\?\)"):
        corral.spawn(python("pass"), nproc=2, log_dir=tmp_path / "logs")  # type: ignore[call-arg]
    assert not (tmp_path / "logs").exists()


def test_pid_namespace_must_be_a_bool_or_none(tmp_path: Path) -> None:
    """The containment choice is validated with the rest."""
    with pytest.raises(corral.ConfigError, match="pid_namespace"):
        corral.spawn(python("pass"), nprocs=1, pid_namespace="yes")  # type: ignore[arg-type]
