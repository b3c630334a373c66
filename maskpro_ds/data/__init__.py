"""Data: text sources (``texts``), fixed token samples with stable ids (``samples``), the batch schedule (``schedule``)."""
