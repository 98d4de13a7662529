"""Detector stage: YOLO (ultralytics, only here), classical colour detector, dataset converters."""
