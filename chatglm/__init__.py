from .messages import ChatMessage
