"""The five-minute example: `conveyor up --app examples.hello:app`, then enqueue from another shell."""

from __future__ import annotations

import asyncio

from conveyor import App, Retry, current_task

app = App()


@app.task(queue="default", max_attempts=5, timeout=30)
def send_welcome(to: str) -> str:
    print(f"sending a welcome email to {to}")
    return f"sent to {to}"


@app.task(max_attempts=3)
async def resize(image_id: int, width: int = 640) -> dict[str, int]:
    await asyncio.sleep(0.1)  # pretend to work
    return {"image_id": image_id, "width": width}


@app.task(max_attempts=4)
def flaky(n: int) -> int:
    if current_task().attempt < 3:
        raise Retry(delay=1, reason="the upstream is busy")
    return n * 2


if __name__ == "__main__":
    handle = send_welcome.enqueue("ada@example.com")
    print("enqueued", handle.id, "->", handle.result(timeout=30))
    app.close()
