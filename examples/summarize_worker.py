"""An example worker: serves task type ``summarize``.

Run it as an agent that declares the capability, then submit tasks:

    fabric run summarizer --capability summarize -- python3 examples/summarize_worker.py
    fabric task submit summarize --data '{"text": "a long text to shorten"}' --wait
"""

from __future__ import annotations

from typing import Any

from fabric.worker import TaskContext, Worker

worker = Worker()


@worker.task("summarize", concurrency=4)
async def summarize(ctx: TaskContext, payload: Any) -> dict[str, Any]:
    text = str(payload.get("text", "")) if isinstance(payload, dict) else str(payload)
    await ctx.progress(0.5, "counting words")
    words = text.split()
    return {"words": len(words), "summary": " ".join(words[:8])}


if __name__ == "__main__":
    worker.main()
