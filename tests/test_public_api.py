"""The public surface is exactly SPEC.md's names, all reporting module 'corral'."""

from __future__ import annotations

import corral

SPEC_NAMES = {
    "spawn",
    "run",
    "Group",
    "Result",
    "Failure",
    "RankLogs",
    "Std",
    "record",
    "CorralError",
    "ConfigError",
    "GroupFailedError",
}
#: Beyond the SPEC: the typed keyword set of spawn/run (so that no public
#: signature names a private type).
EXTRA_NAMES = {"Event", "Line", "Lines", "RankStats", "Rendezvous", "SpawnOptions"}


def test_all_matches_spec() -> None:
    """corral.__all__ lists exactly the SPEC names, sorted."""
    assert set(corral.__all__) == SPEC_NAMES | EXTRA_NAMES
    assert list(corral.__all__) == sorted(corral.__all__)


def test_exports_live_in_corral() -> None:
    """Every export prints as corral.X in tracebacks and reprs."""
    for name in corral.__all__:
        assert getattr(corral, name).__module__ == "corral", name


def test_error_hierarchy() -> None:
    """ConfigError is a CorralError and a ValueError; GroupFailedError is a CorralError."""
    assert issubclass(corral.ConfigError, corral.CorralError)
    assert issubclass(corral.ConfigError, ValueError)
    assert issubclass(corral.GroupFailedError, corral.CorralError)
