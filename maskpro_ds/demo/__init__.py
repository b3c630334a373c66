"""The end-to-end demo (``maskpro-demo``): offline assets, every product stage, the results table and plots."""
