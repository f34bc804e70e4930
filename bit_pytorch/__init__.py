"""BiT in PyTorch: `models` (ResNet-v2 and the load/predict/embed/save contract), `data`
(torchvision input pipeline) and `train` (`python -m bit_pytorch.train`)."""
