"""Render the systemd units in ``deploy/systemd`` for one host's paths.

    python -m fabric.deploy_units --bin /opt/agent-fabric/bin \\
        --etc /etc/agent-fabric --state /var/lib/agent-fabric --out /etc/systemd/system

The templates hold three placeholders: ``@BIN@`` (the venv's bin directory,
where ``fabric``, ``fabric-node`` and ``nats-server`` are), ``@ETC@`` (config,
PKI and ``fabric.env``) and ``@STATE@`` (the node's and the server's data).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["UNIT_NAMES", "render_unit", "render_units", "template_dir"]

UNIT_NAMES = ("fabric-nats.service", "fabric-controller.service", "fabric-node.service")


def template_dir() -> Path:
    """``deploy/systemd`` of a source checkout (the units are not part of the wheel)."""
    return Path(__file__).resolve().parents[1] / "deploy" / "systemd"


def _check_absolute(name: str, path: Path) -> None:
    # systemd wants absolute paths, and a space or '%' would change a unit's meaning.
    text = str(path)
    if not path.is_absolute() or any(c in text for c in " %$\\\n\"'"):
        raise ValueError(f"{name} must be an absolute path without spaces or specials: {text!r}")


def render_unit(template: str, *, bin_dir: Path, etc_dir: Path, state_dir: Path) -> str:
    for name, path in (("--bin", bin_dir), ("--etc", etc_dir), ("--state", state_dir)):
        _check_absolute(name, path)
    return (
        template.replace("@BIN@", str(bin_dir))
        .replace("@ETC@", str(etc_dir))
        .replace("@STATE@", str(state_dir))
    )


def render_units(
    out_dir: Path, *, bin_dir: Path, etc_dir: Path, state_dir: Path, source: Path | None = None
) -> list[Path]:
    source = source or template_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in UNIT_NAMES:
        text = render_unit(
            (source / name).read_text(), bin_dir=bin_dir, etc_dir=etc_dir, state_dir=state_dir
        )
        target = out_dir / name
        target.write_text(text)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fabric.deploy_units", description=__doc__)
    parser.add_argument("--bin", type=Path, default=Path(sys.executable).parent)
    parser.add_argument("--etc", type=Path, default=Path("/etc/agent-fabric"))
    parser.add_argument("--state", type=Path, default=Path("/var/lib/agent-fabric"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    try:
        paths = render_units(args.out, bin_dir=args.bin, etc_dir=args.etc, state_dir=args.state)
    except (ValueError, OSError) as exc:
        print(f"deploy_units: error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
