"""Std and Std.parse: the stream-spec mini-language."""

from __future__ import annotations

import pytest

from corral import ConfigError, Std


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("0", Std.NONE),
        ("1", Std.OUT),
        ("2", Std.ERR),
        ("3", Std.ALL),
        ("all", Std.ALL),
        (" ALL ", Std.ALL),
        ("out", Std.OUT),
        ("err", Std.ERR),
        ("none", Std.NONE),
    ],
)
def test_parse_single_value(spec: str, expected: Std) -> None:
    """A single value applies to every rank and is returned as a Std."""
    assert Std.parse(spec) is expected


def test_parse_per_rank_mapping() -> None:
    """'rank:value' items give a dict; names and digits mix; whitespace is tolerated."""
    assert Std.parse("0:1,1:2") == {0: Std.OUT, 1: Std.ERR}
    assert Std.parse(" 0 : out , 1:err, 3: 3 ") == {0: Std.OUT, 1: Std.ERR, 3: Std.ALL}


@pytest.mark.parametrize(
    ("spec", "token"),
    [
        ("", "empty"),
        ("4", "'4'"),
        ("loud", "'loud'"),
        ("0:1,,1:2", "empty item"),
        ("-1:1", "'-1'"),
        ("0:1,0:2", "rank 0 is repeated"),
        ("x:1", "'x'"),
        ("0:5", "'5'"),
    ],
)
def test_parse_rejects_bad_specs_naming_the_token(spec: str, token: str) -> None:
    """Bad specs raise ConfigError (also a ValueError) whose message names the bad token."""
    with pytest.raises(ConfigError, match=token) as info:
        Std.parse(spec)
    assert isinstance(info.value, ValueError)


def test_std_is_an_intflag() -> None:
    """Std combines like flags: ALL is OUT | ERR."""
    assert Std.OUT | Std.ERR is Std.ALL
    assert int(Std.ALL) == 3
