"""Tables of the HTTP API's authentication (API keys). Schema changes go with migration 0002."""

from __future__ import annotations
