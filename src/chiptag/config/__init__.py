"""Validated configuration: the models (config.schema) and loading with overrides (config.loading)."""

from chiptag.config.loading import dump, from_dict, load, parse_override
from chiptag.config.schema import (AugmentConfig, Config, DataConfig, FeaturesConfig, LabelsConfig, ModelEntry,
                                   OutputConfig, ReportConfig, SchedulerConfig, SplitConfig, SplitFiles, TrackingConfig,
                                   TrainingConfig)

__all__ = ["AugmentConfig", "Config", "DataConfig", "FeaturesConfig", "LabelsConfig", "ModelEntry", "OutputConfig",
           "ReportConfig", "SchedulerConfig", "SplitConfig", "SplitFiles", "TrackingConfig", "TrainingConfig",
           "dump", "from_dict", "load", "parse_override"]
