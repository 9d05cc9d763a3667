"""Errors that reach users: each names the file, tensor or field at fault and what was expected."""


class ChatGLMError(Exception):
    """Base of every error the package raises on purpose; the CLI prints these as one line."""


class ModelFileError(ChatGLMError, ValueError):
    """A model, tokenizer or config file is missing, truncated, malformed or of an unknown kind."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ChatFormatError(ChatGLMError, ValueError):
    """A conversation the model's chat format cannot express (bad role, wrong order, empty)."""
