"""HTTP serving: one FastAPI app for every protocol (OpenAI, ChatGLM-6B / LangChain, GLM API, ChatGLM2 SSE)."""
from .app import create_app

__all__ = ["create_app"]
