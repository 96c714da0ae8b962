"""Settings: frozen models, loaded once at the process edge from file, environment and flags.

settings = load_settings()            # defaults < conveyor.yaml < CONVEYOR_* < overrides
settings.worker.concurrency           # then passed down as a value; nothing rereads os.environ
"""

from conveyor.config.loader import load_settings
from conveyor.config.settings import (
    ApiSettings,
    EmbeddedSettings,
    LogFormat,
    LogLevel,
    SchedulerSettings,
    Settings,
    WorkerSettings,
)

__all__ = [
    "ApiSettings",
    "EmbeddedSettings",
    "LogFormat",
    "LogLevel",
    "SchedulerSettings",
    "Settings",
    "WorkerSettings",
    "load_settings",
]
