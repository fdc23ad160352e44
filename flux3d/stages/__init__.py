"""Stages: plain functions over one asset (no Prefect or Ray imports), each returning a StageResult."""
