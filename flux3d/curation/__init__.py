"""Curation: the aesthetic scorer, the texture checks (colour heuristic + VLM judge) and the keep/reject policy.

Stages and runners call these; nothing here imports Prefect or Ray (DESIGN.md sec. 2).
"""
