"""The progress engine: in-flight ops, matching, ordering and failure propagation."""

from .engine import Engine, EngineConfig
from .ordering import GroupState

__all__ = ["Engine", "EngineConfig", "GroupState"]
