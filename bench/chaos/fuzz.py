"""Long-form input fuzzing of a live node agent and controller (not a test).

    python bench/chaos/fuzz.py                    # 2,000 cases per subject
    python bench/chaos/fuzz.py --examples 20000   # longer
    python bench/chaos/fuzz.py --only node        # or: controller

Runs the engine of ``tests/test_security_fuzz.py`` (hypothesis strategies:
random bytes, wrong types, huge fields, deep nesting, invalid ids, subject
injection; no token, junk, forged, expired or read-only tokens) against a
real TLS nats-server, a node agent ``n1`` hosting one agent and a controller
holding one deployment, all in a temporary directory removed at the end.
Every case must get a reply that is a coded ErrorReply (never ``internal``)
or the subject's valid result; afterwards the node's agents and the
controller's deployments must be what they were, and both must still answer.

Prints one row per subject: cases, valid results, the error codes seen, the
slowest reply and the rate, then the state checks. Exits 1 if any fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
for entry in (ROOT / "tests", ROOT):
    if str(entry) not in sys.path:
        sys.path.insert(0, str(entry))

from fleetfixtures import controller_config, running  # noqa: E402
from natsfixtures import Clients, make_pki  # noqa: E402
from test_security_fuzz import (  # noqa: E402
    Tally,
    Target,
    Tokens,
    controller_targets,
    fuzz,
    node_targets,
)
from test_security_rig import SLEEPER, node_config, running_node  # noqa: E402

from fabric.controller.service import Controller  # noqa: E402
from fabric.nats_server import NatsServer  # noqa: E402
from fabric.tokens import TokenIssuer  # noqa: E402
from schemas import subjects  # noqa: E402
from schemas.agent import AgentSpec  # noqa: E402
from schemas.api import ApiResult  # noqa: E402
from schemas.codec import decode, encode  # noqa: E402
from schemas.command import CommandResult, ListAgents, PlaceAgent  # noqa: E402


def _table(rows: list[tuple[str, Tally]]) -> str:
    head = ("subject", "cases", "ok", "errors by code", "slowest ms", "cases/s")
    lines = [head]
    for name, t in rows:
        codes = ", ".join(
            f"{k.removeprefix('error:')} {n}"
            for k, n in t.replies.most_common()
            if k.startswith("error:")
        )
        rate = t.examples / t.seconds if t.seconds else 0.0
        lines.append(
            (
                name,
                str(t.examples),
                str(t.replies["ok"]),
                codes,
                f"{t.slowest * 1000:.1f}",
                f"{rate:.0f}",
            )
        )
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    out = []
    for i, row in enumerate(lines):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


async def _request(nc: Any, subject: str, message: Any) -> bytes:
    msg = await nc.request(subject, encode(message), timeout=10)
    return bytes(msg.data)


async def _run(examples: int, only: str | None) -> int:
    checks: list[tuple[str, bool]] = []
    rows: list[tuple[str, Tally]] = []
    with tempfile.TemporaryDirectory(prefix="fabric-fuzz-") as tmp:
        base = Path(tmp)
        pki = make_pki(base / "pki")
        issuer = TokenIssuer.from_file(pki.dir / "signing.key", issuer="bench")
        tokens = Tokens(pki)
        async with NatsServer.local(pki.dir, base / "nats") as server:
            clients = Clients(pki, server.url)
            try:
                op = await clients("op-1")
                ctl = Controller(await clients("ctl-1"), controller_config(pki, "ctl-1"))
                async with (
                    running(ctl),
                    running_node(node_config(pki, server.url, base / "node")) as node,
                ):
                    place = PlaceAgent(
                        spec=AgentSpec(name="steady", argv=SLEEPER, start_seconds=0),
                        token=issuer.mint("bench", ["agents:run"]),
                    )
                    await _request(op, subjects.node_commands("n1"), place)
                    keep = {
                        "deployment": {
                            "spec": {"name": "keep", "argv": ["sleep", "1"]},
                            "replicas": 1,
                            "constraints": {"labels": {"zone": "nowhere-at-all"}},
                        },
                        "token": issuer.mint("bench", ["agents:run"]),
                    }
                    await _request(op, subjects.api("create"), keep)

                    async def agents() -> list[tuple[str, Any, Any, int]]:
                        listed = decode(
                            await _request(
                                op,
                                subjects.node_commands("n1"),
                                ListAgents(token=issuer.mint("bench", ["read"])),
                            ),
                            CommandResult,
                        )
                        return [(a.agent_id, a.state, a.pid, a.restarts) for a in listed.agents]

                    def desired() -> dict[str, Any]:
                        assert ctl.deployments is not None
                        return {
                            n: (r.deployment, r.generation, r.deleting)
                            for n, (r, _) in ctl.deployments.items.items()
                        }

                    agents_before, desired_before = await agents(), desired()
                    targets: list[Target] = []
                    if only in (None, "node"):
                        targets += node_targets(tokens, "steady")
                    if only in (None, "controller"):
                        targets += controller_targets(tokens)
                    for target in targets:
                        tally = Tally()
                        rows.append((target.name, tally))
                        print(f"fuzzing {target.name} ({examples} cases)...", flush=True)
                        try:
                            await fuzz(target, await clients(target.sender), examples, tally)
                            checks.append((f"{target.name}: every reply coded", True))
                        except Exception:
                            # Hypothesis reports the (shrunk) falsifying case; keep it readable.
                            report = traceback.format_exc()
                            print(report if len(report) < 4000 else report[-4000:])
                            checks.append((f"{target.name}: every reply coded", False))

                    checks.append(("node agents unchanged", await agents() == agents_before))
                    checks.append(("deployments unchanged", desired() == desired_before))
                    listed = decode(
                        await _request(
                            op, subjects.api("list"), {"token": issuer.mint("bench", ["read"])}
                        ),
                        ApiResult,
                    )
                    checks.append(
                        ("controller answers", [d.name for d in listed.deployments] == ["keep"])
                    )
                    handler = node._handler
                    checks.append(
                        ("node not draining", handler is not None and not handler.draining)
                    )
                    print(
                        f"\naudit: node wrote {node.audit.emitted} refusal events,"
                        f" suppressed {node.audit.suppressed}; controller wrote"
                        f" {ctl.audit.emitted}, suppressed {ctl.audit.suppressed}"
                    )
            finally:
                await clients.aclose()
    print()
    print(_table(rows))
    print()
    for label, ok in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {label}")
    total = sum(t.examples for _, t in rows)
    print(f"\n{total} cases over {len(rows)} subjects")
    return 0 if all(ok for _, ok in checks) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=2000, help="cases per subject")
    parser.add_argument("--only", choices=("node", "controller"))
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(_run(args.examples, args.only)))


if __name__ == "__main__":
    main()
