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
