"""fabric-node: the per-host node agent.

The supervision core (no NATS in it) is split one job per module:

- ``lifecycle``: the agent state machine and its history
- ``restart``: restart policy decisions (backoff, intensity)
- ``reaper``: the single owner of ``waitpid``; child subreaper; exit futures
- ``spawn``: turning an AgentSpec into a running child process
- ``logfiles``: size-rotated stdout/stderr files, tail and follow
- ``cgroup`` / ``limits``: cgroup v2 detection and per-limit mechanisms
- ``health``: health checks and the verdict logic
- ``metrics``: per-agent process-tree and per-node samples
- ``state_store``: durable local state for re-adoption
- ``supervisor``: the act layer that drives all of the above
"""
