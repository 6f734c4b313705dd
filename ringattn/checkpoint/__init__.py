"""Activation checkpointing at very long context: ring-aware policies and a memory planner."""

from ringattn.checkpoint.policies import CHOICES, POLICIES, apply_checkpointing, ring_aware_policy

__all__ = ["CHOICES", "POLICIES", "apply_checkpointing", "ring_aware_policy"]
