"""What a detection target means, written out independently of multisal.objectives: the sum of a
class's score over the anchors whose decoded box overlaps the given box by IoU >= a threshold,
IoU computed as a division (multisal compares intersection with iou * union). NumPy only, so the
legacy (Chainer) tests can use it too; torch tensors go through as_array."""
import numpy as np


def overlap_mask(values, box, iou=0.5):
    """(N, anchors) float: 1 where the anchor's box (cx, cy, w, h: values[:, 0:4], float64
    (N, values, anchors)) overlaps box = (x1, y1, x2, y2) by IoU >= iou."""
    cx, cy, w, h = (values[:, i] for i in range(4))
    x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    bx1, by1, bx2, by2 = box
    inter = (np.clip(np.minimum(x2, bx2) - np.maximum(x1, bx1), 0, None)
             * np.clip(np.minimum(y2, by2) - np.maximum(y1, by1), 0, None))
    return (inter / (w * h + (bx2 - bx1) * (by2 - by1) - inter) >= iou).astype(np.float64)


def detection_objective(values, channel, box, iou=0.5, objectness=False, as_array=np.asarray):
    """Per sample: the sum over anchors of class `channel`'s score (times the objectness) where
    overlap_mask is 1; `values` (N, values, anchors), a float64 array or tensor; `as_array` turns
    the NumPy mask into the values' kind (torch.from_numpy for tensors). No gradient flows
    through the mask."""
    plain = values.detach().numpy() if hasattr(values, "detach") else np.asarray(values)
    mask = as_array(overlap_mask(plain, box, iou))
    score = values[:, 5 + channel] * values[:, 4] if objectness else values[:, 4 + channel]
    return (score * mask).sum(1)
