"""The error types promptlab raises. Every message names the problem and its place (task, file, line)."""


class PromptlabError(Exception):
    """Base class of every error promptlab raises on purpose."""


class TemplateError(PromptlabError, ValueError):
    """A task template is malformed (bad marker, splits, braces, answer field)."""


class DataError(PromptlabError, ValueError):
    """A data file or record is malformed: the message names the file or record and the line."""


class DownloadError(PromptlabError, OSError):
    """A download failed, was tampered with, or a required file is missing from the source."""


class ConfigError(PromptlabError, ValueError):
    """A config (YAML or dataclass) has an unknown key, a bad value, or names an unknown task."""


class ModelLoadError(PromptlabError, OSError):
    """A base model could not be loaded (missing package, offline hub name, bad directory)."""


class PromptTableError(PromptlabError, ValueError):
    """A prompt table file is corrupt, truncated, or belongs to another base model."""


class CheckpointError(PromptlabError, ValueError):
    """A training checkpoint is corrupt or belongs to another config or base model."""


class TrainingError(PromptlabError, FloatingPointError):
    """Training cannot go on: the loss became NaN or infinite (the message names the step and what to try)."""


class AdapterError(PromptTableError):
    """A PEFT adapter cannot be written or read: a template PEFT cannot express, another base model, or a
    missing or corrupt file."""
