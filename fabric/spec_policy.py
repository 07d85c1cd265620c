"""What an agent spec may ask of a node: the checks against spec abuse.

A spec is data from an operator's token holder, and the node runs it; these
rules keep that data from reaching further than the fabric means it to.
Each refusal is a :class:`~schemas.errors.ContractError` with its own stable
code, raised before anything is spawned or stored.

Checked by the controller at ``create``/``update`` (:func:`check_spec`: the
rules that hold on every node, so ``fabric run`` fails at once), for exec
tasks when their payload is read (:func:`check_env`, :func:`check_cwd`), and
by the node agent on every ``place`` (:func:`check_on_node`: the same rules
plus the node's own settings, since a node never trusts that a controller
checked).

argv
    Executed directly (``execve``), never through a shell, so shell
    metacharacters in it are plain bytes of the arguments. ``shell: true`` is
    the one, explicit opt-in: argv is then exactly one string run by
    ``/bin/sh -c`` (the schema refuses more). Nothing here turns a shell on.
env (``spec_env_reserved``)
    ``FABRIC_*`` is the fabric's namespace: the node agent sets
    ``FABRIC_AGENT_ID``, ``FABRIC_NODE_ID``, ``FABRIC_NATS_URL``,
    ``FABRIC_CA``, ``FABRIC_CERT``/``FABRIC_KEY`` (the worker identity) for
    the agent, and the agent's own fabric clients read them. A spec setting
    any ``FABRIC_*`` key is refused, rather than silently overridden, so the
    operator learns the value was never used. (At spawn the fabric's values
    are applied last as well.)
cwd (``spec_cwd_forbidden``)
    An absolute, normalised path (no ``.``/``..`` components, no repeated
    ``/``, no NUL). By default any such directory may be used: a node agent
    runs what its operators ask, as systemd would. A node started with
    ``--agent-cwd-root DIR`` admits only ``DIR`` and what is below it, with
    symlinks resolved at placement time (so a link inside ``DIR`` pointing
    out is refused); a directory that does not exist yet is judged by its
    path. The check is made once, at placement: a link changed later, by
    someone who may write under ``DIR``, is followed by the next spawn, so
    keep ``DIR`` writable only by those trusted to choose where agents run.
user/group (``spec_root_forbidden``)
    A spec whose ``user`` is uid 0 (``root``, or any name the node maps to
    uid 0) or whose ``group`` is gid 0 is refused unless the node allows root
    agents (``--allow-root-agents``; off by default). The controller refuses
    the names ``root`` at create unless it is told the fleet allows root
    agents; other names are resolved on the node only. A spec with no
    ``user`` runs as the node agent's own user: on a node agent that runs as
    root that is root, and this check does not refuse it (give such specs a
    ``user``). Exec health checks run as the agent's user and group too.
logs
    Log files live at ``<state_dir>/logs/<agent id>/{stdout,stderr}.log``;
    the spec names no path, and the agent id is checked against the id
    pattern (no ``/``, no ``..``) by the decoder and again here.
"""

from __future__ import annotations

import grp
import os
import posixpath
import pwd
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from schemas.agent import AgentSpec
from schemas.errors import ContractError, ErrorCode
from schemas.ids import validate_id

__all__ = [
    "RESERVED_ENV_PREFIX",
    "NodeSpecPolicy",
    "check_cwd",
    "check_env",
    "check_on_node",
    "check_spec",
]

RESERVED_ENV_PREFIX = "FABRIC_"


@dataclass(frozen=True, slots=True)
class NodeSpecPolicy:
    """A node's own limits on the specs it runs.

    ``allow_root_agents``: run specs whose user is uid 0 or group gid 0.
    ``cwd_root``: when set, an agent's ``cwd`` must be this directory or below it.
    """

    allow_root_agents: bool = False
    cwd_root: Path | None = None


def check_spec(spec: AgentSpec, *, allow_root_agents: bool = False) -> None:
    """The rules that hold on every node; raises ContractError with the rule's code.

    ``allow_root_agents`` false refuses the user or group named ``root`` (what
    a controller can know without the node's user database).
    """
    validate_id(spec.name, "agent id")
    check_env(spec.env, f"agent {spec.name}")
    if spec.cwd is not None:
        check_cwd(spec.cwd)
    if not allow_root_agents and "root" in (spec.user, spec.group):
        raise _root_refused(spec, "it is named root")


def check_on_node(
    spec: AgentSpec,
    policy: NodeSpecPolicy,
    *,
    uid_of: Callable[[str], int] | None = None,
    gid_of: Callable[[str], int] | None = None,
) -> None:
    """Every rule of :func:`check_spec` plus the node's ``policy``.

    ``uid_of``/``gid_of`` resolve names (default: this host's user and group
    database); a name they do not know is left to the spawn, which fails it.
    """
    check_spec(spec, allow_root_agents=policy.allow_root_agents)
    if not policy.allow_root_agents:
        if spec.user is not None and _resolve(uid_of or _uid, spec.user) == 0:
            raise _root_refused(spec, f"user {spec.user!r} is uid 0 on this node")
        if spec.group is not None and _resolve(gid_of or _gid, spec.group) == 0:
            raise _root_refused(spec, f"group {spec.group!r} is gid 0 on this node")
    if spec.cwd is not None and policy.cwd_root is not None:
        _check_cwd_root(spec.cwd, policy.cwd_root)


def check_env(env: Mapping[str, str], owner: str) -> None:
    """Refuse ``FABRIC_*`` keys (``spec_env_reserved``); ``owner`` names whose env it is."""
    reserved = sorted(k for k in env if k.startswith(RESERVED_ENV_PREFIX))
    if reserved:
        shown = ", ".join(reserved[:5]) + (" ..." if len(reserved) > 5 else "")
        raise ContractError(
            ErrorCode.SPEC_ENV_RESERVED,
            f"{owner}: env may not set {shown}: {RESERVED_ENV_PREFIX}* is the"
            " fabric's own (the node agent sets them for the agent)",
        )


def _cwd_refused(cwd: str, why: str) -> ContractError:
    shown = repr(cwd) if len(cwd) <= 200 else repr(cwd[:197] + "...")
    return ContractError(ErrorCode.SPEC_CWD_FORBIDDEN, f"cwd {shown}: {why}")


def check_cwd(cwd: str) -> None:
    """Refuse a cwd that is not absolute and normalised (``spec_cwd_forbidden``)."""
    if "\x00" in cwd:
        raise _cwd_refused(cwd, "contains a NUL byte")
    if not cwd.startswith("/"):
        raise _cwd_refused(cwd, "must be an absolute path")
    if posixpath.normpath(cwd) != cwd or cwd.startswith("//"):
        raise _cwd_refused(cwd, "must be normalised (no '.', '..' or repeated '/')")


def _check_cwd_root(cwd: str, root: Path) -> None:
    real_root = os.path.realpath(root)
    # realpath resolves every symlink that exists; a part that does not exist
    # yet stays as written, and the form check already ruled out '..'.
    real = os.path.realpath(cwd)
    if real != real_root and not real.startswith(real_root.rstrip("/") + "/"):
        raise _cwd_refused(cwd, f"this node runs agents only under {root} (it resolves to {real})")


def _root_refused(spec: AgentSpec, why: str) -> ContractError:
    return ContractError(
        ErrorCode.SPEC_ROOT_FORBIDDEN,
        f"agent {spec.name} would run as root ({why}) and root agents are not allowed",
    )


def _resolve(lookup: Callable[[str], int], name: str) -> int | None:
    try:
        return lookup(name)
    except KeyError:
        return None


def _uid(name: str) -> int:
    return pwd.getpwnam(name).pw_uid


def _gid(name: str) -> int:
    return grp.getgrnam(name).gr_gid
