"""Engine integrations: ``kvtier.integrations.transformers.TieredCache`` (needs transformers 5)."""
