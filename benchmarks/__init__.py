"""lrm_rt benchmark suite (``lrm-rt bench``): per-stage timings against the PyTorch baseline."""
