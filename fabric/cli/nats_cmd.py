"""`fabric nats`: run the embedded nats-server, or print a production config.

``fabric nats up --state-dir DIR`` makes a PKI under ``DIR/pki`` if there is
none, issues an ``operator`` identity ``admin`` if it is missing, runs
nats-server in the foreground and prints the environment a client needs. While
it runs, a change to the PKI inventory (``fabric pki issue`` / ``revoke``)
regenerates the user list and reloads the server: no restart, no dropped
client. Ctrl-C or SIGTERM stops it cleanly (exit 0).

``fabric nats config --pki DIR`` prints the config of one server, or of each
server of a cluster, followed by the ``auth.conf`` they all include.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import shlex
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from cryptography import x509

from fabric.cli import CommandFailed, UsageError
from fabric.connect import ENV_CA, ENV_CERT, ENV_KEY, ENV_URL
from fabric.nats_config import (
    AUTH_FILE,
    ClusterSettings,
    LeafSettings,
    ServerSettings,
    cluster_routes,
    render_authorization,
    render_server_config,
)
from fabric.nats_server import NatsServer, NatsServerError
from fabric.pki import PkiError, init_pki, issue_identity, load_inventory

__all__ = ["register"]

ADMIN = "admin"
DEFAULT_PORT = 4222
DEFAULT_CLUSTER_PORT = 6222
DEFAULT_STORE = Path("/var/lib/fabric/jetstream")
_INVENTORY_POLL = 1.0  # seconds; a changed inventory is picked up this fast
_LOOPBACK = {"127.0.0.1", "::1", "localhost", "0.0.0.0", "::"}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    parser = subparsers.add_parser(
        "nats", help="the NATS server", description="Run or configure the fabric's nats-server."
    )
    verbs = parser.add_subparsers(dest="nats_verb", metavar="ACTION")
    verbs.required = True

    # Options are plain strings checked by the handlers: argparse's own errors
    # are two lines (usage + error), and ours must be one.
    up = verbs.add_parser("up", help="run a local nats-server in the foreground")
    up.add_argument("--state-dir", metavar="DIR", help="PKI, config, logs and JetStream live here")
    up.add_argument(
        "--port", default=str(DEFAULT_PORT), metavar="N", help="client port (4222; 0: any free)"
    )
    up.add_argument("--host", default="127.0.0.1", metavar="H", help="listen address (127.0.0.1)")
    up.set_defaults(handler=_up)

    run = verbs.add_parser(
        "run",
        help="run one production server (or cluster member) in the foreground",
        description=(
            "Render this server's config from the PKI and run nats-server in the foreground "
            "(systemd, containers). Reloads the user list when the PKI inventory changes."
        ),
    )
    run.add_argument("--pki", metavar="DIR", help="PKI directory (fabric pki init)")
    run.add_argument("--state-dir", metavar="DIR", help="config, log and JetStream store")
    run.add_argument("--name", default="fabric", metavar="NAME", help="server name (fabric)")
    run.add_argument("--host", default="0.0.0.0", metavar="H", help="listen address (0.0.0.0)")
    run.add_argument("--port", default=str(DEFAULT_PORT), metavar="N", help="client port")
    run.add_argument("--cluster", metavar="NAME", help="cluster name; needs --server")
    run.add_argument("--server", metavar="H1,H2,H3", help="every cluster member's host")
    run.add_argument(
        "--cluster-port", default=str(DEFAULT_CLUSTER_PORT), metavar="N", help="route port"
    )
    _leaf_arguments(run)
    run.set_defaults(handler=_run)

    config = verbs.add_parser("config", help="print a production nats-server config")
    config.add_argument("--pki", metavar="DIR", help="PKI directory (fabric pki init)")
    config.add_argument("--cluster", metavar="NAME", help="cluster name; needs --server")
    config.add_argument(
        "--server", metavar="H1,H2,H3", help="comma-separated cluster hosts, one config each"
    )
    config.add_argument(
        "--store-dir", default=str(DEFAULT_STORE), metavar="D", help=f"JetStream ({DEFAULT_STORE})"
    )
    config.add_argument("--port", default=str(DEFAULT_PORT), metavar="N", help="client port")
    config.add_argument(
        "--cluster-port", default=str(DEFAULT_CLUSTER_PORT), metavar="N", help="route port"
    )
    config.add_argument("--monitor-port", metavar="N", help="HTTPS monitoring on loopback")
    config.add_argument(
        "--auth-only", action="store_true", help=f"print only {AUTH_FILE} (after issue/revoke)"
    )
    _leaf_arguments(config)
    config.set_defaults(handler=_config)


def _leaf_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--leaf-port", metavar="N", help="hub side: accept leaf-node links (edge servers) here"
    )
    parser.add_argument(
        "--leaf-of",
        metavar="H:P,...",
        help="edge side: be a leaf of these hub servers' leaf ports (keeps running without them)",
    )
    parser.add_argument(
        "--domain", metavar="NAME", help="edge side: this site's own JetStream domain"
    )


def _leaf(args: argparse.Namespace) -> LeafSettings | None:
    remotes = tuple(r.strip() for r in (args.leaf_of or "").split(",") if r.strip())
    for remote in remotes:
        host, sep, port = remote.rpartition(":")
        if not sep or not host:
            raise UsageError(f"--leaf-of takes HOST:PORT, not {remote!r}")
        _port(port, "--leaf-of port")
    listen = None if args.leaf_port is None else _port(args.leaf_port, "--leaf-port")
    domain = (args.domain or "").strip() or None
    if domain is not None and not domain.replace("-", "").replace("_", "").isalnum():
        raise UsageError(f"bad --domain {args.domain!r}: letters, digits, '-' and '_' only")
    if domain is not None and not remotes:
        raise UsageError("--domain is for an edge server: give --leaf-of too")
    if listen is None and not remotes:
        return None
    return LeafSettings(listen_port=listen, remotes=remotes, domain=domain)


def _port(text: str | None, flag: str, *, allow_zero: bool = False) -> int:
    try:
        port = int(text or "")
    except ValueError:
        raise UsageError(f"{flag} must be a port number, not {text!r}") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise UsageError(f"{flag} must be from {0 if allow_zero else 1} to 65535, not {port}")
    return port


def _dir(text: str | None, flag: str) -> Path:
    if not text:
        raise UsageError(f"{flag} DIR is required")
    return Path(text).resolve()


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    # PkiError is about what was asked (no CA, bad name): exit 2. The server
    # or the disk failing is exit 1.
    try:
        yield
    except PkiError as exc:
        raise UsageError(str(exc)) from None
    except NatsServerError as exc:
        raise CommandFailed(str(exc).splitlines()[0]) from None
    except OSError as exc:
        raise CommandFailed(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")) from None


# -- up -------------------------------------------------------------------------


def _up(args: argparse.Namespace) -> int:
    state_dir = _dir(args.state_dir, "--state-dir")
    port = _port(args.port, "--port", allow_zero=True)  # 0: any free port
    host = args.host.strip()
    if not host:
        raise UsageError("--host must not be empty")
    pki_dir = state_dir / "pki"
    with _errors():
        if not (pki_dir / "ca.crt").exists():
            init_pki(pki_dir, hosts=_server_hosts(host))
        admin = [e for e in load_inventory(pki_dir) if e.name == ADMIN]
        if not admin:
            issue_identity(pki_dir, "operator", ADMIN)
        elif admin[0].revoked:
            # Revocation is respected: the printed settings will be refused.
            print(f"fabric: warning: identity {ADMIN!r} is revoked in {pki_dir}", file=sys.stderr)
        server = NatsServer.local(pki_dir, state_dir, host=host, port=port)
        return asyncio.run(_serve(server, pki_dir))


def _server_hosts(host: str) -> list[str]:
    """Extra SANs for a fresh server certificate (loopback is always in)."""
    if host in ("0.0.0.0", "::"):
        # Listening everywhere: other machines will dial it by this name.
        return [socket.gethostname()]
    return [] if host in _LOOPBACK else [host]


async def _serve(server: NatsServer, pki_dir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
        try:
            _print_env(server, pki_dir)
            return await _run_until_stopped(server, pki_dir, stop)
        finally:
            await server.stop()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _print_env(server: NatsServer, pki_dir: Path) -> None:
    print(f"nats-server {server.url} (pid {server.pid}), log: {server.log_path}")
    env = {
        ENV_URL: server.url,
        ENV_CA: pki_dir / "ca.crt",
        ENV_CERT: pki_dir / f"{ADMIN}.crt",
        ENV_KEY: pki_dir / f"{ADMIN}.key",
    }
    for name, value in env.items():
        print(f"export {name}={shlex.quote(str(value))}")
    # Whoever reads our stdout through a pipe (a script, a test) sees it now.
    sys.stdout.flush()


def _inventory_stamp(pki_dir: Path) -> tuple[int, int] | None:
    try:
        st = (pki_dir / "inventory.json").stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size)


async def _run_until_stopped(server: NatsServer, pki_dir: Path, stop: asyncio.Event) -> int:
    stamp = _inventory_stamp(pki_dir)
    # Plain tasks rather than a TaskGroup: a TaskGroup would wrap the
    # CommandFailed below in an ExceptionGroup, and the CLI prints only the former.
    stopped = asyncio.create_task(stop.wait())
    exited = asyncio.create_task(server.wait())
    try:
        while True:
            await asyncio.wait({stopped, exited}, timeout=_INVENTORY_POLL)
            if stopped.done():
                return 0
            if exited.done():
                raise CommandFailed(
                    f"nats-server exited unexpectedly (code {exited.result()});"
                    f" see {server.log_path}"
                )
            # The inventory is rewritten by every issue/revoke: regenerate the
            # users and reload, so revocation needs no restart.
            new_stamp = _inventory_stamp(pki_dir)
            if new_stamp != stamp:
                stamp = new_stamp
                await server.reload()
                print("reloaded the user list from the PKI inventory", flush=True)
    finally:
        for task in (stopped, exited):
            task.cancel()
        await asyncio.gather(stopped, exited, return_exceptions=True)


# -- run ------------------------------------------------------------------------


def _run(args: argparse.Namespace) -> int:
    pki_dir = _dir(args.pki, "--pki")
    state_dir = _dir(args.state_dir, "--state-dir")
    if not (pki_dir / "ca.crt").is_file():
        raise UsageError(f"no CA in {pki_dir}: run `fabric pki init --dir {pki_dir}` first")
    name = args.name.strip()
    if not name or any(c.isspace() for c in name):
        raise UsageError(f"bad --name {args.name!r}")
    hosts = [h.strip() for h in (args.server or "").split(",") if h.strip()]
    if (args.cluster is None) != (not hosts):
        raise UsageError("--cluster NAME and --server H1,H2,H3 go together")
    cluster = None
    if args.cluster is not None:
        port = _port(args.cluster_port, "--cluster-port")
        cluster = ClusterSettings(
            name=args.cluster.strip(), port=port, routes=cluster_routes(hosts, port), host=args.host
        )
    settings = ServerSettings(
        server_name=name,
        pki_dir=pki_dir,
        store_dir=state_dir / "jetstream",
        host=args.host,
        port=_port(args.port, "--port"),
        cluster=cluster,
        leaf=_leaf(args),
    )
    with _errors():
        return asyncio.run(_serve_forever(NatsServer(settings, state_dir / "nats"), pki_dir))


async def _serve_forever(server: NatsServer, pki_dir: Path) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    try:
        print(f"nats-server {server.settings.server_name} on {server.url} (pid {server.pid})")
        sys.stdout.flush()
        return await _run_until_stopped(server, pki_dir, stop)
    finally:
        await server.stop()


# -- config ---------------------------------------------------------------------


def _config(args: argparse.Namespace) -> int:
    pki_dir = _dir(args.pki, "--pki")
    if not (pki_dir / "ca.crt").is_file():
        raise UsageError(f"no CA in {pki_dir}: run `fabric pki init --dir {pki_dir}` first")
    with _errors():
        auth = render_authorization(pki_dir)
    if args.auth_only:
        sys.stdout.write(auth)
        return 0
    port = _port(args.port, "--port")
    monitor = None if args.monitor_port is None else _port(args.monitor_port, "--monitor-port")
    store_dir = Path(args.store_dir)
    hosts = [h.strip() for h in (args.server or "").split(",") if h.strip()]
    if args.cluster is not None and not hosts:
        raise UsageError("--cluster needs --server host1,host2,host3")
    if hosts and args.cluster is None:
        raise UsageError("--server needs --cluster NAME")
    out: list[str] = []
    if args.cluster is None:
        settings = ServerSettings(
            server_name="fabric",
            pki_dir=pki_dir,
            store_dir=store_dir,
            host="0.0.0.0",
            port=port,
            monitor_port=monitor,
            leaf=_leaf(args),
        )
        with _errors():
            out.append(render_server_config(settings))
    else:
        out += _cluster_configs(args, pki_dir, store_dir, hosts, port, monitor)
    out.append(f"# ==== {AUTH_FILE} (next to each config; the same on every server) ====\n")
    out.append(auth)
    sys.stdout.write("\n".join(out))
    return 0


def _cluster_configs(
    args: argparse.Namespace,
    pki_dir: Path,
    store_dir: Path,
    hosts: list[str],
    port: int,
    monitor: int | None,
) -> list[str]:
    name = args.cluster.strip()
    if not name or any(c.isspace() for c in name):
        raise UsageError(f"bad --cluster name {args.cluster!r}")
    if len(hosts) < 2:
        raise UsageError("a cluster needs at least two --server hosts (three for JetStream R3)")
    if len(set(hosts)) != len(hosts):
        raise UsageError("--server lists a host twice")
    cluster_port = _port(args.cluster_port, "--cluster-port")
    routes = cluster_routes(hosts, cluster_port)
    missing = _hosts_missing_from_cert(pki_dir, hosts)
    out: list[str] = []
    if missing:
        # Routes verify each other's certificate against the route host name.
        warning = (
            f"server certificate has no SAN for {', '.join(missing)}: routes will fail;"
            f" re-run `fabric pki init --dir {pki_dir} --force` with --host for each server"
        )
        print(f"fabric: warning: {warning}", file=sys.stderr)
        out.append(f"# WARNING: {warning}\n")
    for i, host in enumerate(hosts, start=1):
        settings = ServerSettings(
            server_name=f"{name}-{i}",
            pki_dir=pki_dir,
            store_dir=store_dir,
            host="0.0.0.0",
            port=port,
            monitor_port=monitor,
            cluster=ClusterSettings(name=name, port=cluster_port, routes=routes, host="0.0.0.0"),
            leaf=_leaf(args),
        )
        out.append(f"# ==== server {i} of {len(hosts)}: {host} (nats-{i}.conf) ====")
        with _errors():
            out.append(render_server_config(settings))
    return out


def _hosts_missing_from_cert(pki_dir: Path, hosts: list[str]) -> list[str]:
    try:
        cert = x509.load_pem_x509_certificate((pki_dir / "server.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return list(hosts)
    names = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    ips = set(san.get_values_for_type(x509.IPAddress))
    missing = []
    for host in hosts:
        try:
            ok = ipaddress.ip_address(host) in ips
        except ValueError:
            ok = host.lower() in names
        if not ok:
            missing.append(host)
    return missing
