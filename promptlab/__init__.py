"""promptlab: prompt tuning, p-tuning and deep prompt tuning of frozen causal language models."""
from .version import __version__

from .errors import (AdapterError, CheckpointError, ConfigError, DataError, DownloadError, ModelLoadError,
                     PromptlabError, PromptTableError, TemplateError, TrainingError)
from .models import BaseModel, load_base_model
from .templates import TaskTemplate, default_tasks, load_tasks
from .model import PromptLearningModel
from .table import PromptTable
from .train import Trainer, TrainConfig
from .evaluate import evaluate
from .precision import Precision, choose_precision
from .adapters import export_peft, import_peft
