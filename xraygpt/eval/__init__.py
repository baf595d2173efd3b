"""Evaluation: predictions JSONL, ROUGE / NLG / clinical-efficacy metrics, bootstrap CIs and tables.

Entry point for scripts: ``xraygpt.eval.score.score_predictions`` (and ``xraygpt.eval.tables.compare``).
Submodules are imported on use so that ``import xraygpt.eval`` stays cheap.
"""
