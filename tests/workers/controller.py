"""A whole controller as its own process, with test timings, for kill -9 tests.

``controller.py NAME --pki DIR [--lease-ttl S] [--ack-wait S] [--node-timeout S]``:
the real :class:`~fabric.controller.service.Controller` (registry, lease,
reconcile loop, dispatcher), connected from the ``FABRIC_*`` env (a
controller identity; ``FABRIC_NATS_URL`` may list a cluster). What
``fabric controller run`` does, plus the task queue's ack wait and retry
delays, which that command leaves at their production values (a 30 s ack
wait: a killed controller's tasks would come back after half a minute).
Prints ``ready INBOX`` once the controller serves: INBOX is the prefix of the
reply subjects of its requests (the tasks it sends to workers among them), so
a test watching ``agents.*.tasks`` knows which controller sent what.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from fabric.connect import connect
from fabric.controller.service import Controller, ControllerConfig
from fabric.controller.streams import StreamSettings
from fabric.tasks.dispatch import DispatchSettings
from fabric.tasks.stream import QueueSettings


async def main(args: argparse.Namespace) -> None:
    nc = await connect(name=f"controller-{args.name}")
    config = ControllerConfig(
        name=args.name,
        signing_key=args.pki / "signing.key",
        verify_keys=(args.pki / "signing.pub",),
        node_timeout=args.node_timeout,
        reconcile_interval=0.1,
        lease_ttl=args.lease_ttl,
        streams=StreamSettings(lease_ttl=args.lease_ttl),
    )
    ctl = Controller(nc, config)
    ctl.task_settings = DispatchSettings(  # type: ignore[attr-defined]
        queue=QueueSettings(ack_wait=args.ack_wait),
        no_agent_delay=0.1,
        no_agent_max=0.5,
        retry_base=0.1,
        retry_cap=1.0,
        handback_delay=0.05,
        shun_for=2.0,
        busy_hold=0.5,
        fetch_wait=0.5,
    )
    loop = asyncio.get_running_loop()
    runner = asyncio.create_task(ctl.run())
    loop.add_signal_handler(signal.SIGTERM, runner.cancel)
    ready = asyncio.create_task(ctl.started.wait())
    done, _ = await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready in done:
        # Both inboxes the assignments it sends reply to: nats-py's request
        # prefix, made on the first request and kept until close (no public
        # accessor; the controller has made requests by now), and its batched
        # lane's, once the dispatcher has opened it.
        dispatcher = ctl.dispatcher
        assert dispatcher is not None
        await asyncio.wait_for(dispatcher.ready.wait(), timeout=30)
        prefix = nc._resp_sub_prefix
        inboxes = [bytes(prefix).decode().rstrip(".") if prefix else "?"]
        if dispatcher.lane is not None:
            inboxes.append(dispatcher.lane.inbox)
        print("ready", *inboxes, flush=True)
    try:
        await runner
    except asyncio.CancelledError:
        pass
    finally:
        await nc.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    parser.add_argument("--ack-wait", type=float, default=3.0)
    parser.add_argument("--node-timeout", type=float, default=3.0)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(main(parser.parse_args()))
