"""The PyTorch backend: autograd with hooks on the asked-for layers."""
