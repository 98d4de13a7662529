"""Whole-slide files: read a scanner's pyramid (OpenSlide), find the monolayer, plan the reading path.

Imports no stage, no pipeline, no report and no CLI: ``smear.pipeline.wsi_run`` counts the cells.
"""
