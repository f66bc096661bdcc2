"""promptlab: prompt tuning and p-tuning of frozen causal language models."""
__version__ = "0.1.0"

from .errors import (CheckpointError, ConfigError, DataError, DownloadError, ModelLoadError,
                     PromptlabError, PromptTableError, TemplateError)
from .models import BaseModel, load_base_model
from .templates import TaskTemplate, default_tasks, load_tasks
from .model import PromptLearningModel
from .table import PromptTable
from .train import Trainer, TrainConfig
from .evaluate import evaluate
