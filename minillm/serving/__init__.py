"""Chapter 9: serving many users. scheduler.py decides which tokens run each step, blocks.py owns the
paged KV pool (with prefix caching) and runs a packed step, engine.py ties them to requests, and
server.py puts an OpenAI-compatible HTTP API in front (imported on its own: it needs starlette)."""
from .engine import Engine, QueueFull, Request, generate_many

__all__ = ["Engine", "QueueFull", "Request", "generate_many"]
