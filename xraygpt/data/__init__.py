"""Datasets: report readers, MeSH tag parsing, the embedded rendered dataset and the caption dataset reader.

Kept import-free on purpose: ``import xraygpt.data`` must stay cheap; import the submodule you need.
"""
