"""Per-sample values: loss, logit margin, prediction; gathered on the device, moved in batches."""

from __future__ import annotations

from .per_sample import PerSampleLoss, classification_signals, is_classification
from .recorder import HostPacket, SampleRecorder

__all__ = ["HostPacket", "PerSampleLoss", "SampleRecorder", "classification_signals", "is_classification"]
