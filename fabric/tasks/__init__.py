"""Task queues: JetStream work queues consumed by controllers and run by workers.

* :mod:`fabric.tasks.stream` - streams ``TASKS`` / ``TASKS_DEAD``, the shared
  ``dispatch`` consumer, the ``fabric_tasks`` bucket.
* :mod:`fabric.tasks.records` - the task record and its state machine.
* :mod:`fabric.tasks.agents` - the pure :func:`~fabric.tasks.agents.choose_agent`
  and a controller's view of running agents and their capabilities.
* :mod:`fabric.tasks.dispatch` - the dispatcher every controller runs.
* :mod:`fabric.tasks.priority` - what ``Task.priority`` orders: the tasks one
  dispatcher holds waiting for a slot, and each fetched batch.
* :mod:`fabric.tasks.batch` - ``exec`` tasks: a command run once as a
  one-shot agent, its exit code, duration and output tail as the result.
* :mod:`fabric.tasks.admission` - the submit token a dispatcher checks first
  (refused tasks are recorded ``refused`` and never run), and retries.
* :mod:`fabric.tasks.backlog` - the backlog per type (discovery, top, metrics).
* :mod:`fabric.tasks.client` - submit, get, wait, list, dead letters and retry
  (SDK and CLI).

The worker side is :mod:`fabric.worker`.

Guarantees: a submitted task is acknowledged only once JetStream stored it;
the same id within the duplicate window is stored once; a task is run at
least once (a dispatcher or worker lost mid-run means it runs again), its
message acked only after its final record is in KV; after ``max_attempts``
failed runs it is copied to ``tasks.<type>.dead`` and termed. Fire-and-forget
``tasks.<type>.direct`` tasks are at most once.
"""
