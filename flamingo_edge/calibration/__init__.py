"""Calibration data from real images and prompts, FP16/INT8 graphs, and TensorRT calibration caches."""
