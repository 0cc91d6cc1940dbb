"""The training service: ``bp-train``'s recipe and what it is made of (Lightning, Hydra, MLflow).

Imports point one way: this package uses the core (functions, layers, gradcheck, capture) and the
shared formats (bundle, tables, files, home, commands), never the tools (explain, bench) or serving.
"""
