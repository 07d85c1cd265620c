"""nats-server configuration rendered from the fabric's PKI (pure text, tiny file reads).

Two files per server:

* the main config (:func:`render_server_config`): one mutual-TLS client
  listener with ``verify_and_map``, JetStream, optionally a cluster whose routes
  are mutual TLS too and accept only the server certificate, optionally an
  HTTPS monitoring port on loopback. There is no plaintext listener at all.
* ``auth.conf`` (:func:`render_authorization`), included by the main config:
  one user per active identity, named by the DN of the identity's latest
  certificate (which carries that certificate's serial, so a revoked or
  replaced certificate of the same name maps to no user), with that role's
  permissions. Issuing or revoking an identity rewrites only this file and the
  running server reloads it (SIGHUP) without a restart; the reload also closes
  live connections whose certificate no longer maps to a user.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fabric.permissions import permissions_for
from fabric.pki import Identity, PkiError, active_identities

__all__ = [
    "AUTH_FILE",
    "ClusterSettings",
    "LeafSettings",
    "ServerSettings",
    "cluster_routes",
    "render_authorization",
    "render_server_config",
    "render_users",
    "server_dn",
    "write_text_atomic",
]

AUTH_FILE = "auth.conf"

# With verify_and_map and an empty user list nats-server turns authorization
# off and admits every certificate the CA signed with full rights. So the user
# list is never empty: this user maps to no certificate the PKI can issue
# (names cannot start with '-') and may do nothing at all.
_SENTINEL_DN = "CN=-,OU=-,O=agent-fabric"


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """Cluster (route) listener of one server.

    ``routes`` are ``host:port`` of every server in the cluster; listing the
    server itself is harmless (nats-server skips it) and lets one list serve
    all members. The server certificate must carry each route host in its SANs
    (``fabric pki init --host``), since routes verify each other's certificate.
    """

    name: str
    port: int
    routes: tuple[str, ...] = ()
    host: str | None = None  # listen address; the client listener's host if None


@dataclass(frozen=True, slots=True)
class LeafSettings:
    """Leaf-node links: a hub accepts them on ``listen_port``; an edge server
    dials ``remotes`` (``host:port`` of hub servers).

    An edge site runs its own server as a leaf of the hub cluster, with its
    own JetStream ``domain``: its clients, streams and KV keep working while
    the uplink is down, and traffic flows to the hub again when it heals.
    Both ends authenticate with the server certificate (mutual TLS), and a
    hub admits only that certificate's DN on its leaf port.
    """

    listen_port: int | None = None
    remotes: tuple[str, ...] = ()
    domain: str | None = None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """Everything the main config of one server depends on.

    Sizes are bytes; ``ping_interval`` is seconds. The server pings clients so a
    node agent that vanished without closing its socket is dropped within
    ``ping_interval * ping_max`` rather than the default four minutes.
    """

    server_name: str
    pki_dir: Path
    store_dir: Path
    host: str = "127.0.0.1"
    port: int = 4222
    jetstream: bool = True
    max_memory_store: int | None = None
    max_file_store: int | None = None
    cluster: ClusterSettings | None = None
    leaf: LeafSettings | None = None
    monitor_port: int | None = None
    max_payload: int = 1024 * 1024
    ping_interval: int = 10
    ping_max: int = 3
    tls_timeout: float = 2.0

    @property
    def ca_file(self) -> Path:
        return self.pki_dir / "ca.crt"

    @property
    def cert_file(self) -> Path:
        return self.pki_dir / "server.crt"

    @property
    def key_file(self) -> Path:
        return self.pki_dir / "server.key"


def _q(value: str | Path) -> str:
    # JSON string syntax is valid nats-server config syntax, and quoting keeps
    # "$JS.API.>" from being read as a variable reference.
    return json.dumps(str(value))


def _hostport(host: str, port: int) -> str:
    try:
        if ipaddress.ip_address(host).version == 6:
            return f"[{host}]:{port}"
    except ValueError:
        pass
    return f"{host}:{port}"


def server_dn(pki_dir: Path) -> str:
    """Subject DN of the server certificate, in the form nats-server compares."""
    path = pki_dir / "server.crt"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise PkiError(f"no server certificate in {pki_dir}: run `fabric pki init`") from None
    except ValueError as exc:
        raise PkiError(f"cannot read {path}: {exc}") from None
    return cert.subject.rfc4514_string()


def _tls_block(settings: ServerSettings, indent: str, *, verify_line: str) -> list[str]:
    return [
        f"{indent}tls {{",
        f"{indent}  cert_file: {_q(settings.cert_file.resolve())}",
        f"{indent}  key_file: {_q(settings.key_file.resolve())}",
        f"{indent}  ca_file: {_q(settings.ca_file.resolve())}",
        f"{indent}  {verify_line}",
        f"{indent}  timeout: {settings.tls_timeout:g}",
        f"{indent}}}",
    ]


def render_server_config(settings: ServerSettings, *, auth_file: str = AUTH_FILE) -> str:
    """The main nats-server config for ``settings``; it includes ``auth_file``.

    ``auth_file`` is resolved by nats-server relative to the directory of the
    main config, so both files are written side by side.
    """
    s = settings
    lines = [
        "# agent-fabric nats-server config: generated, do not edit by hand.",
        f"server_name: {_q(s.server_name)}",
        f"listen: {_q(_hostport(s.host, s.port))}",
        "",
        "# Mutual TLS on the only client listener: the certificate's DN picks the",
        "# user (see the included authorization), no certificate means no entry.",
        *_tls_block(s, "", verify_line="verify_and_map: true"),
        "",
        f"max_payload: {s.max_payload}",
        f'ping_interval: "{s.ping_interval}s"',
        f"ping_max: {s.ping_max}",
    ]
    if s.jetstream:
        lines += ["", "jetstream {", f"  store_dir: {_q(s.store_dir.resolve())}"]
        if s.leaf is not None and s.leaf.domain:
            lines.append(f"  domain: {_q(s.leaf.domain)}")
        if s.max_memory_store is not None:
            lines.append(f"  max_memory_store: {s.max_memory_store}")
        if s.max_file_store is not None:
            lines.append(f"  max_file_store: {s.max_file_store}")
        lines.append("}")
    if s.cluster is not None:
        c = s.cluster
        routes = ", ".join(_q(f"nats-route://{r}") for r in c.routes)
        lines += [
            "",
            "# Routes are mutual TLS with the server certificate, and only that",
            "# certificate's DN is accepted: a client certificate from the same CA",
            "# cannot pose as a cluster peer.",
            "cluster {",
            f"  name: {_q(c.name)}",
            f"  listen: {_q(_hostport(c.host or s.host, c.port))}",
            f"  routes: [{routes}]",
            f"  authorization {{ user: {_q(server_dn(s.pki_dir))} }}",
            *_tls_block(s, "  ", verify_line="verify_and_map: true"),
            "}",
        ]
    if s.leaf is not None:
        lines += ["", *_leaf_block(s, s.leaf)]
    if s.monitor_port is not None:
        lines += [
            "",
            "# Monitoring over HTTPS (same certificate), loopback only.",
            f"https: {_q(_hostport('127.0.0.1', s.monitor_port))}",
        ]
    lines += ["", f"include {_q(auth_file)}", ""]
    return "\n".join(lines)


def _leaf_block(s: ServerSettings, leaf: LeafSettings) -> list[str]:
    lines = ["# Leaf-node links: mutual TLS with the server certificate only.", "leafnodes {"]
    if leaf.listen_port is not None:
        lines += [
            f"  listen: {_q(_hostport(s.host, leaf.listen_port))}",
            f"  authorization {{ users: [{{ user: {_q(server_dn(s.pki_dir))} }}] }}",
            *_tls_block(s, "  ", verify_line="verify_and_map: true"),
        ]
    if leaf.remotes:
        # Dialling out, the server presents its certificate and checks the hub's.
        tls = "\n".join(line for line in _tls_block(s, "      ", verify_line="") if line.strip())
        # One remote with every hub URL: the edge holds one link and fails over.
        urls = ", ".join(_q(f"tls://{r}") for r in leaf.remotes)
        remotes = f"    {{\n      urls: [{urls}]\n{tls}\n    }}"
        lines += ["  remotes: [", remotes, "  ]"]
    lines.append("}")
    return lines


def render_users(identities: Iterable[Identity]) -> str:
    """The ``authorization`` block for ``identities`` (each mapped by its DN).

    Permissions follow the identity's name and role, never its serial: a
    re-issued node keeps ``nodes.<node_id>.>`` under its new DN.
    """
    lines = [
        "# agent-fabric users: generated from the PKI inventory, do not edit by hand.",
        "authorization {",
        "  users = [",
        f"    {{user: {_q(_SENTINEL_DN)}, permissions: "
        '{publish: {deny: [">"]}, subscribe: {deny: [">"]}}}',
    ]
    for ident in sorted(identities, key=lambda i: i.name):
        perms = permissions_for(ident.role, ident.name).to_config()
        serial = f", serial {ident.serial}" if ident.serial else ", DN without serial"
        lines.append(f"    # {ident.name} ({ident.role}{serial})")
        lines.append(f"    {{user: {_q(ident.dn)}, permissions: {json.dumps(perms)}}}")
    lines += ["  ]", "}", ""]
    return "\n".join(lines)


def render_authorization(pki_dir: Path) -> str:
    """``auth.conf`` for every active (issued, not revoked) identity in ``pki_dir``."""
    return render_users(active_identities(pki_dir))


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` whole: a reload never reads a half-written file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def cluster_routes(hosts: Sequence[str], port: int) -> tuple[str, ...]:
    """``host:port`` route list for servers listening on the same cluster port."""
    return tuple(_hostport(h, port) for h in hosts)
