"""Typed run configuration (`sections.py`: the pydantic models whose YAML is their saved
form) and reading it (`load.py`: file + overrides → validated config, problems reported
at once). Import from here: `from kotune.config import load_config, KotuneConfig`."""

from ..errors import ConfigError
from .load import (
    FLAG_KEYS,
    PLACEHOLDERS,
    SEED_MAPPING,
    apply_overrides,
    cache_root,
    config_reference,
    input_column,
    load_config,
    parse_override,
    target_column,
)
from .sections import (
    DEFAULT_TEMPLATE,
    SECTIONS,
    TASK_ALIASES,
    DataSection,
    GenerationSection,
    KotuneConfig,
    LoggingSection,
    LoraSection,
    MemorySection,
    ModelSection,
    RetrievalSection,
    TrainingSection,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "FLAG_KEYS",
    "PLACEHOLDERS",
    "SECTIONS",
    "SEED_MAPPING",
    "TASK_ALIASES",
    "ConfigError",
    "DataSection",
    "GenerationSection",
    "KotuneConfig",
    "LoggingSection",
    "LoraSection",
    "MemorySection",
    "ModelSection",
    "RetrievalSection",
    "TrainingSection",
    "apply_overrides",
    "cache_root",
    "config_reference",
    "input_column",
    "load_config",
    "parse_override",
    "target_column",
]
