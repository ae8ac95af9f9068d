"""The API server process, in layers: config → routing → gateway → surfaces → front door → serve.

See docs/architecture.md.
"""
