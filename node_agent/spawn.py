"""Turn an AgentSpec into a running child process, fast.

``subprocess.Popen`` and never ``asyncio.create_subprocess_*``: the reaper
(node_agent.reaper) is the only waiter, and Popen returns only once the
child has exec'd (or raises the exec error).

Popen spawns with vfork (~0.7 ms here) unless it is given a ``preexec_fn``;
then it makes a full fork of the node agent (tens of MB) and waits for the
copy to exec: 5-8 ms of wall time and ~1.8 ms of the node's CPU per spawn
(page tables, then copy-on-write faults on both sides), measured with 65 MB
of RSS. So no ``preexec_fn``. An agent that gets its own cgroup or rlimits
is instead started *held*: vfork + exec of ``/bin/sh`` blocked reading its
stdin, a pipe. The parent then writes the pid into the agent's
``cgroup.procs``, sets the rlimits with ``prlimit(pid)``, and releases it
with one byte; the shell execs the agent's argv with ``/dev/null`` on
stdin, in the same process (same pid, same create time, already in its
cgroup and under its limits before the agent's first instruction).
:func:`spawn` returns once the shell has let go of the pipe, i.e. at that
exec, so "Popen returned" still means "exec'd": 1.1 ms of the node's wall
time and 0.44 ms of its CPU here instead of 7.3 and 1.8 with the fork. If
the node agent dies before the release, the shell sees EOF and exits 111
without running the program.
What the shell could change is put back: it would add ``PWD`` (and bash as
sh ``SHLVL``) to the environment and search ``PATH`` by its own default
when there is none; an environment with names the shell cannot carry, or an
argv[0] starting with ``-``, falls back to the fork with ``preexec_fn``.
The executable is looked up before the spawn so that a missing one is
still an OSError here (``cannot spawn``), not an exit 127 of the shell.
One difference is left: a file the kernel refuses to exec (ENOEXEC: an
executable text file without a ``#!`` line) is run by the shell as a shell
script, as ``sh`` and ``execvp`` do, where a direct exec would fail.

The caller must register the pid with the reaper before its next await and
hand the Popen to :func:`mark_reaped` once the reaper has the status, so
Popen's own cleanup never calls ``waitpid`` on a pid that may be reused.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import re
import resource
import select
import shlex
import signal
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from fabric.spec_policy import RESERVED_ENV_PREFIX
from node_agent.limits import RLimit
from node_agent.reaper import ExitInfo, same_process
from schemas.agent import AgentSpec

__all__ = [
    "build_argv",
    "build_env",
    "mark_reaped",
    "release",
    "signal_group",
    "signal_known",
    "spawn",
]


def build_argv(spec: AgentSpec) -> list[str]:
    if spec.shell:
        return ["/bin/sh", "-c", spec.argv[0]]
    return list(spec.argv)


def build_env(spec: AgentSpec, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """spec.env over the node agent's environment (unless clean_env), then extra_env.

    The node's own ``FABRIC_*`` settings are never inherited: they name the
    node's certificate and key, and an agent holding them could speak as the
    node. What an agent may know of the fabric comes in ``extra_env`` only.
    """
    env: dict[str, str] = {}
    if not spec.clean_env:
        env = {k: v for k, v in os.environ.items() if not k.startswith(RESERVED_ENV_PREFIX)}
    env.update(spec.env)
    if extra_env:
        env.update(extra_env)
    return env


def _child_setup(rlimits: list[RLimit], cgroup_procs: Path | None) -> Callable[[], None] | None:
    """The fallback: join the cgroup and set rlimits in a forked child, before exec."""
    if not rlimits and cgroup_procs is None:
        return None
    target = bytes(cgroup_procs) if cgroup_procs is not None else None

    def setup() -> None:
        if target is not None:
            fd = os.open(target, os.O_WRONLY)
            try:
                os.write(fd, b"0")  # "0" means the writing process itself
            finally:
                os.close(fd)
        for res, soft, hard in rlimits:
            resource.setrlimit(res, (soft, hard))

    return setup


_SH = "/bin/sh"
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# What sh may add to or change in the environment it passes on.
_SHELL_VARS = ("PWD", "SHLVL")


def _can_hold(argv: list[str], env: Mapping[str, str]) -> bool:
    return (
        not argv[0].startswith("-")
        and all(_NAME.fullmatch(name) for name in env)
        and os.access(_SH, os.X_OK)
    )


def _hold_argv(argv: list[str], env: Mapping[str, str]) -> list[str]:
    """``/bin/sh`` waiting for one line on stdin, then exec of ``argv`` with ``env`` as is."""
    script = ["read _ || exit 111"]
    values = []
    for name in _SHELL_VARS:
        if name in env:
            script.append(f"{name}=$1; export {name}; shift")
            values.append(env[name])
        else:
            script.append(f"unset {name}")
    if "PATH" not in env:  # search like Popen does (not exported, as there was none)
        script.append("PATH=" + shlex.quote(os.defpath))
    script.append('exec "$@" </dev/null')
    return [_SH, "-c", "; ".join(script), "fabric-hold", *values, *argv]


def _check_executable(program: str, env: Mapping[str, str], cwd: str | None) -> None:
    """Raise what exec would (ENOENT, EACCES) for ``program``, searched as Popen does."""
    if cwd is not None and not os.path.isdir(cwd):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), cwd)
    if os.path.dirname(program):
        candidates = [program]
    else:
        candidates = [os.path.join(d, program) for d in os.get_exec_path(dict(env))]
    denied = False
    for path in candidates:
        full = os.path.join(cwd, path) if cwd is not None else path
        if os.path.isfile(full):
            if os.access(full, os.X_OK):
                return
            denied = True
    code = errno.EACCES if denied else errno.ENOENT
    raise OSError(code, os.strerror(code), program)


def _wait_exec(w: int, timeout: float = 5.0) -> None:
    """Wait until the released shell has given up the pipe (its stdin): that is its
    ``exec`` of the agent's argv, so Popen's promise (exec'd on return) holds."""
    poller = select.poll()
    poller.register(w, 0)  # POLLERR (no reader left) is always reported
    poller.poll(timeout * 1000)


def _kill_held(popen: subprocess.Popen[bytes]) -> None:
    """Undo a held spawn that cannot be completed (runs on the loop, before the reaper
    knows the pid, so waiting here takes nothing from it)."""
    with contextlib.suppress(OSError):
        os.killpg(popen.pid, signal.SIGKILL)
    popen.wait()


def spawn(
    spec: AgentSpec,
    *,
    stdout: int,
    stderr: int,
    extra_env: Mapping[str, str] | None = None,
    rlimits: list[RLimit] | None = None,
    cgroup_procs: Path | None = None,
) -> subprocess.Popen[bytes]:
    """Start the agent's process in its own session; raises OSError when it cannot.

    ``stdout``/``stderr`` are file descriptors the child writes to directly.
    With ``rlimits`` or ``cgroup_procs`` the process is in its cgroup and under
    its limits before the agent's program runs (see the module doc).
    """
    argv = build_argv(spec)
    env = build_env(spec, extra_env)
    user_kw: dict[str, object] = {}
    if spec.user is not None or spec.group is not None:
        user_kw = _identity(spec.user, spec.group)
    rlimits = rlimits or []
    common: dict[str, object] = {
        "stdout": stdout,
        "stderr": stderr,
        "cwd": spec.cwd,
        "env": env,
        "close_fds": True,
        "start_new_session": True,
        **user_kw,
    }
    if not rlimits and cgroup_procs is None:
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, **common)  # type: ignore[call-overload,no-any-return]
    if not _can_hold(argv, env):
        return _spawn_forked(argv, common, rlimits, cgroup_procs, bool(user_kw))
    _check_executable(argv[0], env, spec.cwd)
    r, w = os.pipe()
    try:
        try:
            popen: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
                _hold_argv(argv, env), stdin=r, **common
            )
        finally:
            os.close(r)
        try:
            if cgroup_procs is not None:
                _write_pid(cgroup_procs, popen.pid)
            try:
                for res, soft, hard in rlimits:
                    resource.prlimit(popen.pid, res, (soft, hard))
            except PermissionError:
                # prlimit on another user's process needs CAP_SYS_RESOURCE,
                # which a container or sandbox may withhold from root: such
                # an agent sets its own limits in the forked child instead.
                _kill_held(popen)
                held = False
            else:
                os.write(w, b"\n")
                _wait_exec(w)
                held = True
        except BaseException:
            _kill_held(popen)
            raise
    finally:
        os.close(w)
    if not held:
        return _spawn_forked(argv, common, rlimits, cgroup_procs, bool(user_kw))
    return popen


def _spawn_forked(
    argv: list[str],
    common: dict[str, object],
    rlimits: list[RLimit],
    cgroup_procs: Path | None,
    other_user: bool,
) -> subprocess.Popen[bytes]:
    """The slow path: a full fork that sets itself up in ``preexec_fn``."""
    # Popen drops the identity before preexec_fn runs, and an unprivileged process
    # may not move itself into our cgroup: the parent moves it just after exec
    # instead (a child forking in those microseconds escapes).
    join_in_child = None if other_user else cgroup_procs
    popen: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
        argv,
        stdin=subprocess.DEVNULL,
        preexec_fn=_child_setup(rlimits, join_in_child),
        **common,
    )
    if cgroup_procs is not None and join_in_child is None:
        with contextlib.suppress(OSError):  # already gone: the reaper reports its exit
            _write_pid(cgroup_procs, popen.pid)
    return popen


def _write_pid(cgroup_procs: Path, pid: int) -> None:
    fd = os.open(cgroup_procs, os.O_WRONLY)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


def _identity(user: str | None, group: str | None) -> dict[str, object]:
    """Popen keywords to drop to user/group; supplementary groups from the user's entry."""
    kw: dict[str, object] = {}
    gid: int | None = None
    if user is not None:
        entry = pwd.getpwnam(user)
        kw["user"] = entry.pw_uid
        gid = entry.pw_gid
        kw["extra_groups"] = os.getgrouplist(user, entry.pw_gid)
    if group is not None:
        gid = grp.getgrnam(group).gr_gid
    if gid is not None:
        kw["group"] = gid
    return kw


def mark_reaped(popen: subprocess.Popen[bytes], info: ExitInfo) -> None:
    """Tell Popen the child is gone so its finaliser never waits on the pid again."""
    if popen.returncode is None:
        if info.code is not None:
            popen.returncode = info.code
        else:
            popen.returncode = -1


def release(popen: subprocess.Popen[bytes]) -> None:
    """Let go of a child left running (detach): Popen's finaliser must neither warn
    nor call ``waitpid`` on it later, behind the reaper's back."""
    if popen.returncode is None:
        popen.returncode = 0


def signal_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when it is gone (or not ours)."""
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def signal_known(procs: Mapping[int, float], sig: int, *, skip_group: int | None = None) -> int:
    """Signal each (pid -> create time) still alive as that same process; how many.

    ``skip_group``: leave out members of that process group (already signalled
    through the group; a second SIGTERM makes some programs quit uncleanly).
    """
    me = os.getpid()
    hit = 0
    for pid, created in procs.items():
        if pid == me or not same_process(pid, created):
            continue  # gone, or the pid now belongs to someone else
        try:
            if skip_group is not None and os.getpgid(pid) == skip_group:
                continue
            os.kill(pid, sig)
            hit += 1
        except (ProcessLookupError, PermissionError):
            continue
    return hit
