"""chatglm: run the ChatGLM family and llama-family GGUFs locally, fast, and serve them."""
from .errors import ChatFormatError, ChatGLMError, ModelFileError
from .loaders import load_model
from .messages import ChatMessage
from .pipeline import Pipeline
from .tokenizers import load_tokenizer

__all__ = ["Pipeline", "ChatMessage", "load_model", "load_tokenizer", "ChatGLMError", "ModelFileError",
           "ChatFormatError"]
