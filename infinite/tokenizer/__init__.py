"""Tokenizer wrapper, chat templates and streaming detokenization."""

from .detokenizer import IncrementalDetokenizer
from .tokenizer import FALLBACK_TEMPLATE_DOC, Tokenizer, load_tokenizer, render_fallback

__all__ = ["Tokenizer", "load_tokenizer", "render_fallback", "FALLBACK_TEMPLATE_DOC", "IncrementalDetokenizer"]
