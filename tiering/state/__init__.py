"""Tiering's state: where each page is (``PageTable`` and its transitions), the places a page can be (``Tier``,
``TierStack``, the ``LowerTier`` contract), slot books, and demotion plans worked out against them."""
