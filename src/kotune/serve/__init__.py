"""Serve a trained run: an OpenAI-compatible API and a chat page (extra `kotune[serve]`).

From Python:

    from kotune.serve import create_app, run_server
    run_server(create_app("runs/civil_law"), port=8000)
"""

from __future__ import annotations

try:
    import fastapi  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:
    raise ImportError(
        f"`kotune serve` needs FastAPI and uvicorn ({e.name} is missing): pip install 'kotune[serve]'"
    ) from None

from .app import create_app, run_server, running_server  # noqa: E402
from .schemas import Limits  # noqa: E402

__all__ = ["Limits", "create_app", "run_server", "running_server"]
