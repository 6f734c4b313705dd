"""Activation checkpointing at very long context: ring-aware policies and a memory planner."""

from ringattn.checkpoint.policies import POLICIES, apply_checkpointing, ring_aware_policy

__all__ = ["POLICIES", "apply_checkpointing", "ring_aware_policy"]
