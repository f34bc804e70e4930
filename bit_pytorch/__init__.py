"""BiT in PyTorch: `models` (ResNet-v2 and the load/predict/embed/save contract), `data`
(torchvision input pipeline), `backend` (the training step) and `train`
(`python -m bit_pytorch.train`). Importing changes nothing process-wide."""
