"""Task queues: JetStream work queues consumed by controllers and run by workers.

* :mod:`fabric.tasks.stream` - streams ``TASKS`` / ``TASKS_DEAD``, the shared
  ``dispatch`` consumer, the ``fabric_tasks`` bucket.
* :mod:`fabric.tasks.records` - the task record and its state machine.
* :mod:`fabric.tasks.dispatch` - the controller-side dispatcher and the pure
  :func:`~fabric.tasks.dispatch.choose_agent`.
* :mod:`fabric.tasks.client` - submit, get and wait (SDK and CLI).

The worker side is :mod:`fabric.worker`.
"""
