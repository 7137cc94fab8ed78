"""Tiering's transfer engine: ``Tiering`` (commits and the transfer worker), the ``Mover`` (routes by tier pair,
device streams, batches), transfers and their handles, the background demoter, and how each tier's writes go."""
