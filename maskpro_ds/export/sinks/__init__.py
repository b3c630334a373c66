"""Export output formats (sinks); see :mod:`maskpro_ds.export.sinks.registry`."""
