"""Helpers around Hugging Face tokenizers."""
