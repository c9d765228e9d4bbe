"""Tiny random classifiers for the command-line tests, loaded as "tiny_models:classifier" (the
tests' folder is on sys.path). Seeded, so every call builds the same weights."""
import torch


def classifier(classes=5):
    """conv-relu-conv-relu-pool-linear on 3-channel images of any size; CAM layers "2" and "3"."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, classes)).eval()


def unseeded():
    """The same architecture with other weights: a state dict from classifier() must replace them."""
    torch.manual_seed(1)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 5)).eval()


def not_a_module():
    return 42


class _Picky(torch.nn.Module):
    """classifier() that refuses an all-white image (every pixel 1.0 with the "raw" preset) anywhere
    in its batch: a model error that only one input of a batch provokes."""

    def __init__(self):
        super().__init__()
        self.net = classifier()

    def forward(self, x):
        if bool((x.flatten(1) >= 1).all(dim=1).any()):
            raise ValueError("white image")
        return self.net(x)


def picky():
    return _Picky().eval()


class _NaNOnWhite(torch.nn.Module):
    """classifier() whose output is NaN for an all-white image (every pixel 1.0 with the "raw"
    preset) and finite for any other: a model that breaks numerically on one input only."""

    def __init__(self):
        super().__init__()
        self.net = classifier()

    def forward(self, x):
        white = (x.flatten(1) >= 1).all(dim=1, keepdim=True)
        out = self.net(x)
        return torch.where(white, torch.full_like(out, float("nan")), out)


def nan_on_white():
    return _NaNOnWhite().eval()


class _AlwaysNaN(torch.nn.Module):
    """classifier() with every output NaN (a NaN weight, say)."""

    def __init__(self):
        super().__init__()
        self.net = classifier()

    def forward(self, x):
        return self.net(x) * float("nan")


def always_nan():
    return _AlwaysNaN().eval()
