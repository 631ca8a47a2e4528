"""The installed package ships the project's own scripts, byte for byte."""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import fanout
from procs import REPO


def test_the_installed_package_is_tested_not_the_source_tree() -> None:
    installed = Path(fanout.__file__).resolve()
    assert "site-packages" in installed.parts, installed


def test_installed_scripts_equal_the_protocol_crate_scripts() -> None:
    for name in ("publish.lua", "history.lua"):
        source = (REPO / "crates" / "fanout-protocol" / "src" / name).read_bytes()
        shipped = resources.files("fanout").joinpath("scripts", name)
        assert not Path(str(shipped)).is_symlink(), "the wheel must hold the content"
        assert shipped.read_bytes() == source, f"{name} differs from crates/fanout-protocol"
    assert (REPO / "crates/fanout-protocol/src/publish.lua").read_bytes() == fanout.PUBLISH_SCRIPT
    assert (REPO / "crates/fanout-protocol/src/history.lua").read_bytes() == fanout.HISTORY_SCRIPT
    assert hashlib.sha1(fanout.PUBLISH_SCRIPT).hexdigest() == fanout._core.PUBLISH_SCRIPT_SHA


def test_typed_marker_is_shipped() -> None:
    assert resources.files("fanout").joinpath("py.typed").is_file()
