"""The tiers below the GPU: the plug-in registry (``[tiers] order``), the built-in host and NVMe tiers with their
routes, and the digests that check bytes at rest."""
