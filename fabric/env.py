"""Finding the fabric: which NATS URL, certificate and token key the CLI uses.

``fabric up`` writes ``STATE/fabric.env``, a file a shell can source::

    export FABRIC_NATS_URL=tls://127.0.0.1:4222
    export FABRIC_CA=/abs/.fabric/pki/ca.crt
    ...

Every client command looks for its settings in this order, first hit wins:

1. ``--state-dir DIR`` on the command line: ``DIR/fabric.env``;
2. ``FABRIC_NATS_URL`` in the environment: every setting from ``FABRIC_*``;
3. ``FABRIC_STATE_DIR`` in the environment: its ``fabric.env``;
4. ``.fabric/fabric.env`` in the working directory or the nearest parent
   that has one (as git finds ``.git``), so commands work from a subdirectory.

An explicit flag beats the environment (the usual CLI rule): someone who
sourced one fabric's file can still point a single command at another.
Nothing here touches the network.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from fabric.connect import ENV_CA, ENV_CERT, ENV_KEY, ENV_URL
from fabric.pki import write_file_atomic

__all__ = [
    "DEFAULT_STATE_DIR",
    "ENV_FILE",
    "ENV_STATE_DIR",
    "ENV_TOKEN_KEY",
    "FabricEnv",
    "NoFabricError",
    "find_fabric",
    "parse_env_file",
    "render_env_file",
    "write_env_file",
]

ENV_TOKEN_KEY = "FABRIC_TOKEN_KEY"
ENV_STATE_DIR = "FABRIC_STATE_DIR"
ENV_FILE = "fabric.env"
DEFAULT_STATE_DIR = Path(".fabric")

_NOT_FOUND = (
    "no fabric found: run `fabric up` or set FABRIC_NATS_URL, FABRIC_CA, FABRIC_CERT,"
    " FABRIC_KEY and FABRIC_TOKEN_KEY (or pass --state-dir DIR)"
)


class NoFabricError(Exception):
    """No usable settings: the message is one line meant for a person."""


@dataclass(frozen=True, slots=True)
class FabricEnv:
    """Everything a client needs to reach one fabric."""

    url: str
    ca: Path
    cert: Path
    key: Path
    token_key: Path | None
    """The Ed25519 key tokens are minted with; None: read-only use is all that works."""
    state_dir: Path | None
    source: str
    """Where these settings came from, for error messages."""


def parse_env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` pairs of a sourceable file (``export`` optional, shell quoting).

    Only what ``fabric up`` writes needs to parse; anything else on a line
    (a command, a bare word) is an error naming the line, not a silent skip.
    """
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            words = shlex.split(line, comments=True)
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
        if words and words[0] == "export":
            words = words[1:]
        for word in words:
            key, sep, value = word.partition("=")
            if not sep or not key.isidentifier():
                raise ValueError(f"line {number}: expected KEY=VALUE, not {word!r}")
            values[key] = value
    return values


def render_env_file(values: Mapping[str, str], header: str = "") -> str:
    lines = [f"# {line}" for line in header.splitlines()]
    lines += [f"export {key}={shlex.quote(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def write_env_file(path: Path, values: Mapping[str, str], header: str = "") -> None:
    """Write atomically: a CLI reading it meanwhile sees the old file or the new one."""
    data = render_env_file(values, header).encode()
    # 0600: it names the token signing key, which is as good as the key itself
    # to whoever can read that file.
    write_file_atomic(path, data, mode=0o600, force=True)


def _from_values(values: Mapping[str, str], source: str, base: Path | None) -> FabricEnv:
    missing = [k for k in (ENV_URL, ENV_CA, ENV_CERT, ENV_KEY) if not values.get(k)]
    if missing:
        raise NoFabricError(f"{source} does not set {', '.join(missing)}")

    def path(key: str) -> Path:
        p = Path(values[key]).expanduser()
        return p if p.is_absolute() or base is None else base / p

    token = path(ENV_TOKEN_KEY) if values.get(ENV_TOKEN_KEY) else None
    state = path(ENV_STATE_DIR) if values.get(ENV_STATE_DIR) else None
    return FabricEnv(
        url=values[ENV_URL],
        ca=path(ENV_CA),
        cert=path(ENV_CERT),
        key=path(ENV_KEY),
        token_key=token,
        state_dir=state,
        source=source,
    )


def _load_file(path: Path) -> FabricEnv:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NoFabricError(f"no fabric found: {path} does not exist (run `fabric up`)") from None
    except OSError as exc:
        raise NoFabricError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        values = parse_env_file(text)
    except ValueError as exc:
        raise NoFabricError(f"{path}: {exc}") from None
    # Relative paths in a hand-written file are relative to the file.
    return _from_values(values, str(path), path.parent)


def _search_upwards(cwd: Path) -> Path | None:
    for directory in (cwd, *cwd.parents):
        candidate = directory / DEFAULT_STATE_DIR / ENV_FILE
        if candidate.is_file():
            return candidate
    return None


def find_fabric(
    state_dir: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> FabricEnv:
    """The settings to use (see the module docstring); :class:`NoFabricError` if none."""
    env = os.environ if environ is None else environ
    if state_dir is not None:
        return _load_file(Path(state_dir).expanduser().resolve() / ENV_FILE)
    if env.get(ENV_URL):
        return _from_values(env, "the FABRIC_* environment", None)
    if env.get(ENV_STATE_DIR):
        return _load_file(Path(env[ENV_STATE_DIR]).expanduser().resolve() / ENV_FILE)
    found = _search_upwards((cwd or Path.cwd()).resolve())
    if found is None:
        raise NoFabricError(_NOT_FOUND)
    return _load_file(found)
