"""fabric.env: the env file format and the order in which the CLI finds a fabric."""

from __future__ import annotations

from pathlib import Path

import pytest

from fabric import env as fenv
from fabric.env import (
    FabricEnv,
    NoFabricError,
    find_fabric,
    parse_env_file,
    render_env_file,
    write_env_file,
)

VALUES = {
    "FABRIC_NATS_URL": "tls://127.0.0.1:4222",
    "FABRIC_CA": "/s/pki/ca.crt",
    "FABRIC_CERT": "/s/pki/admin.crt",
    "FABRIC_KEY": "/s/pki/admin.key",
    "FABRIC_TOKEN_KEY": "/s/pki/signing.key",
    "FABRIC_STATE_DIR": "/s",
}


def _state(tmp_path: Path, name: str, url: str) -> Path:
    state = tmp_path / name
    state.mkdir(parents=True)
    write_env_file(state / "fabric.env", {**VALUES, "FABRIC_NATS_URL": url})
    return state


def test_public_names_exist() -> None:
    assert [n for n in fenv.__all__ if not hasattr(fenv, n)] == []


def test_render_then_parse_round_trips_awkward_values() -> None:
    values = {**VALUES, "FABRIC_CA": "/a dir/with 'quotes' and $dollar/ca.crt"}
    text = render_env_file(values, header="made by a test\nsecond line")
    assert text.startswith("# made by a test\n# second line\nexport FABRIC_NATS_URL=")
    assert parse_env_file(text) == values


def test_parse_accepts_comments_blank_lines_and_no_export() -> None:
    text = "# comment\n\nFABRIC_NATS_URL=tls://h:1  # trailing\nexport A='b c'\n"
    assert parse_env_file(text) == {"FABRIC_NATS_URL": "tls://h:1", "A": "b c"}


@pytest.mark.parametrize(
    ("text", "match"),
    [("rm -rf /\n", "line 1: expected KEY=VALUE, not 'rm'"), ("A='open\n", "line 1: No closing")],
)
def test_parse_refuses_what_is_not_an_assignment(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_env_file(text)


def test_written_file_is_private(tmp_path: Path) -> None:
    write_env_file(tmp_path / "fabric.env", VALUES)
    assert (tmp_path / "fabric.env").stat().st_mode & 0o777 == 0o600


def test_env_variables_are_used_when_no_flag(tmp_path: Path) -> None:
    found = find_fabric(environ=VALUES, cwd=tmp_path)
    assert found == FabricEnv(
        url="tls://127.0.0.1:4222",
        ca=Path("/s/pki/ca.crt"),
        cert=Path("/s/pki/admin.crt"),
        key=Path("/s/pki/admin.key"),
        token_key=Path("/s/pki/signing.key"),
        state_dir=Path("/s"),
        source="the FABRIC_* environment",
    )


def test_state_dir_flag_beats_the_environment(tmp_path: Path) -> None:
    state = _state(tmp_path, "flagged", "tls://flag:1")
    assert find_fabric(state, environ=VALUES, cwd=tmp_path).url == "tls://flag:1"


def test_fabric_state_dir_variable_is_next(tmp_path: Path) -> None:
    state = _state(tmp_path, "by-var", "tls://var:1")
    assert find_fabric(environ={"FABRIC_STATE_DIR": str(state)}, cwd=tmp_path).url == (
        "tls://var:1"
    )


def test_dot_fabric_is_found_from_a_subdirectory(tmp_path: Path) -> None:
    _state(tmp_path, ".fabric", "tls://here:1")
    deep = tmp_path / "a" / "b"
    deep.mkdir(parents=True)
    found = find_fabric(environ={}, cwd=deep)
    assert found.url == "tls://here:1"
    assert found.source == str(tmp_path / ".fabric" / "fabric.env")


def test_nothing_found_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NoFabricError, match=r"no fabric found: run `fabric up` or set FABRIC_"):
        find_fabric(environ={}, cwd=tmp_path)


def test_missing_state_dir_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(NoFabricError, match=r"fabric\.env does not exist \(run `fabric up`\)"):
        find_fabric(tmp_path / "nowhere", environ={}, cwd=tmp_path)


def test_incomplete_environment_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(NoFabricError, match="does not set FABRIC_CA, FABRIC_CERT, FABRIC_KEY"):
        find_fabric(environ={"FABRIC_NATS_URL": "tls://h:1"}, cwd=tmp_path)


def test_token_key_is_optional(tmp_path: Path) -> None:
    values = {k: v for k, v in VALUES.items() if k != "FABRIC_TOKEN_KEY"}
    assert find_fabric(environ=values, cwd=tmp_path).token_key is None


def test_relative_paths_in_a_file_are_relative_to_it(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    write_env_file(state / "fabric.env", {**VALUES, "FABRIC_CA": "pki/ca.crt"})
    assert find_fabric(state, environ={}, cwd=tmp_path).ca == state / "pki" / "ca.crt"
