"""Errors that more than one module raises or catches, kept apart from the modules that raise
them so that catching one imports nothing heavy (a stage that loads no model never imports
transformers)."""


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says which reference and why."""
