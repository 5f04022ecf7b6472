"""Batch-forward schedulers: how a query plan is evaluated (serial reference and faster ones)."""

from .base import Scheduler, SerialScheduler

__all__ = ["Scheduler", "SerialScheduler"]
