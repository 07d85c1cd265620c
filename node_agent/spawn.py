"""Turn an AgentSpec into a running child process, fast.

``subprocess.Popen`` and never ``asyncio.create_subprocess_*``: the reaper
(node_agent.reaper) is the only waiter, and Popen returns only once the
child has exec'd (or raises the exec error), which is what ``starting``
means. Without ``preexec_fn`` CPython spawns with vfork (~0.1 ms here);
a ``preexec_fn`` forces a full fork (~1 ms, growing with our RSS), so the
child-side hook is installed only when the spec has rlimits or the agent
gets its own cgroup. Both are applied in the child, before exec: the child
has already exec'd when Popen returns, so ``prlimit(pid)`` or a write of
the pid into ``cgroup.procs`` from the parent would race a program that
reads its limits or forks at once.

The caller must register the pid with the reaper before its next await and
hand the Popen to :func:`mark_reaped` once the reaper has the status, so
Popen's own cleanup never calls ``waitpid`` on a pid that may be reused.
"""

from __future__ import annotations

import grp
import os
import pwd
import resource
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

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
    """spec.env over the node agent's environment (unless clean_env), then extra_env."""
    env: dict[str, str] = {} if spec.clean_env else dict(os.environ)
    env.update(spec.env)
    if extra_env:
        env.update(extra_env)
    return env


def _child_setup(rlimits: list[RLimit], cgroup_procs: Path | None) -> Callable[[], None] | None:
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
    """
    user_kw: dict[str, object] = {}
    join_in_child = cgroup_procs
    if spec.user is not None or spec.group is not None:
        user_kw = _identity(spec.user, spec.group)
        # Popen drops the identity before preexec_fn runs, and an unprivileged
        # process may not move itself into our cgroup: the parent moves it just
        # after exec instead (a child forking in those microseconds escapes).
        join_in_child = None
    popen = subprocess.Popen(
        build_argv(spec),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        cwd=spec.cwd,
        env=build_env(spec, extra_env),
        close_fds=True,
        start_new_session=True,
        preexec_fn=_child_setup(rlimits or [], join_in_child),
        **user_kw,  # type: ignore[arg-type]
    )
    if cgroup_procs is not None and join_in_child is None:
        try:
            fd = os.open(cgroup_procs, os.O_WRONLY)
            try:
                os.write(fd, str(popen.pid).encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # already gone: the reaper reports its exit
    return popen


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
