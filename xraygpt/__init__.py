"""xraygpt: chest X-ray summarization with a frozen encoder, a frozen LLM and a trained projection."""

__version__ = "0.1.0"
