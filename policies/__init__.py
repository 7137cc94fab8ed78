"""Eviction and placement policies behind one small interface, and their registry."""

from kvtier.policies import lfu, lru, priority  # noqa: F401  (registers the built-ins)
from kvtier.policies.base import BookkeepingPolicy, Candidate, PageRef, Policy
from kvtier.policies.registry import known_policies, make_policy, register_policy

__all__ = ["BookkeepingPolicy", "Candidate", "PageRef", "Policy", "known_policies", "make_policy", "register_policy"]
