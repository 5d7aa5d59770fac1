"""Image data as tensors: `datasets` (built-in, torchvision, splits, binarization, batches),
`cache` (datasets loaded once per process)."""
