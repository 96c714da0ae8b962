"""The tasks the benchmarks run: no-ops, so what is measured is Conveyor itself."""

from conveyor import App

app = App()


@app.task(name="noop")
def noop(i: int = 0) -> None:
    return None


@app.task(name="anoop")
async def anoop(i: int = 0) -> None:
    return None
