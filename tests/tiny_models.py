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


class TinyYolo(torch.nn.Module):
    """A YOLO-style detector: two strided convs to an 8x8 grid (at 32x32), a 1x1 head, and YOLOv5's
    decoding: centres (2 sigmoid - 0.5 + cell) * stride, sizes (2 sigmoid)^2 * 8 px, sigmoid
    scores. Output (N, 4 + C, anchors) for "yolov8", (N, anchors, 5 + C) for "yolov5"."""

    def __init__(self, n_classes=3, format="yolov8"):
        super().__init__()
        self.format = format
        self.n_values = (5 if format == "yolov5" else 4) + n_classes
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.SiLU(),
                                        torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.SiLU())
        self.head = torch.nn.Conv2d(8, self.n_values, 1)

    def forward(self, x):
        raw = self.head(self.body(x))
        n, _, gh, gw = raw.shape
        stride = x.shape[-1] / gw
        p = torch.sigmoid(raw).flatten(2)                                  # (N, values, anchors)
        gy, gx = torch.meshgrid(torch.arange(gh, dtype=x.dtype), torch.arange(gw, dtype=x.dtype), indexing="ij")
        cx = (2 * p[:, 0] - 0.5 + gx.flatten()) * stride
        cy = (2 * p[:, 1] - 0.5 + gy.flatten()) * stride
        w, h = (2 * p[:, 2]) ** 2 * 8, (2 * p[:, 3]) ** 2 * 8
        out = torch.cat([torch.stack([cx, cy, w, h], 1), p[:, 4:]], 1)
        return out.transpose(1, 2) if self.format == "yolov5" else out


def tiny_yolo():
    """TinyYolo with 3 classes, seeded."""
    torch.manual_seed(0)
    return TinyYolo().eval()
