#!/usr/bin/env python
"""Train the bundled example model: a small residual CNN on scikit-learn's
handwritten digits, exported to ONNX for ``onnxprune``'s examples and tests.

Data
----
``sklearn.datasets.load_digits()`` (shipped with scikit-learn, no download):
1797 grey 8x8 images, pixel values 0..16, 10 classes.

Fixed stratified split (``random_state=SPLIT_SEED``):
  * test   25%  (450 images)  -> ``models/digits_test.npz``
  * calib  15%  (270 images)  -> ``models/digits_calib.npz``
  * train  the remaining ~60% (1077 images), used only here.

Preprocessing (applied to every split; the ``.npz`` files hold the result):
  1. ``x = pixels / 16``                       -> float32 in [0, 1]
  2. bilinear upsampling 8x8 -> 32x32 with
     ``F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)``
  3. ``x = (x - MEAN) / STD`` with the training-split constants
     ``MEAN = 0.3062`` and ``STD = 0.3238`` (computed on the upsampled
     training images; the script re-computes them and warns on a mismatch).
  The model input is therefore ``N x 1 x 32 x 32`` float32; a blank (0)
  pixel maps to ``-MEAN / STD``.

Model
-----
``DigitsResNet``: stem conv3x3(1->32)-BN-ReLU, three stages of one
BasicBlock each (32ch @32x32, 64ch @16x16, 128ch @8x8, stride-2 stages with
a 1x1 conv+BN shortcut), global average pool, Linear(128, 10).  It is
deliberately over-parameterised for an 8x8-pixel task so that removing half
its FLOPs by structured pruning is realistic.

Training: AdamW + cosine LR, label smoothing 0.05, light augmentation
(random shifts of up to 2 px on the 32x32 image), ``EPOCHS`` epochs,
``torch.set_num_threads(1)`` (about 3 minutes on one core).

Outputs
-------
* ``models/digits_resnet.onnx`` -- legacy TorchScript exporter, opset 17,
  input ``input`` [batch,1,32,32], output ``logits`` [batch,10]
  (BatchNorm folded into the convs by the exporter).
* ``models/digits_test.npz`` / ``models/digits_calib.npz`` -- arrays
  ``input`` (float32 N x 1 x 32 x 32, preprocessed) and ``labels`` (int64 N).

The held-out accuracy is verified with onnxruntime on the test split.

Only needed to regenerate those files (not by the package or its tests)::

    pip install torch scikit-learn
    python models/train_digits.py [--epochs N] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))

SPLIT_SEED = 0
TRAIN_SEED = 0
MEAN = 0.3062  # training-split mean after steps 1-2 of the preprocessing
STD = 0.3238   # training-split std  after steps 1-2 of the preprocessing
EPOCHS = 15
BATCH = 64
LR = 3e-3
OPSET = 17


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def upsample(images_8x8: np.ndarray) -> torch.Tensor:
    """Steps 1-2 of the preprocessing: /16 then bilinear 8x8 -> 32x32."""
    x = torch.from_numpy(images_8x8.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    return F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)


def split_indices(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, calib, test) sample indices: the fixed stratified split (also used by train_clutter.py)."""
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=0.25, stratify=labels, random_state=SPLIT_SEED)
    train, calib = train_test_split(
        rest, test_size=0.15 / 0.75, stratify=labels[rest], random_state=SPLIT_SEED
    )
    return train, calib, test


def load_splits():
    d = load_digits()
    images, labels = d.images, d.target.astype(np.int64)
    train, calib, test = split_indices(labels)
    up = upsample(images)
    mean, std = float(up[train].mean()), float(up[train].std())
    if abs(mean - MEAN) > 5e-4 or abs(std - STD) > 5e-4:
        print(f"WARNING: training mean/std {mean:.4f}/{std:.4f} differ from the "
              f"constants {MEAN}/{STD}; update MEAN/STD and the docstring", file=sys.stderr)
    x = ((up - MEAN) / STD).contiguous()
    y = torch.from_numpy(labels)
    return {k: (x[v], y[v]) for k, v in (("train", train), ("calib", calib), ("test", test))}


def random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` px in x and y, filling with
    the background value (what a 0 pixel maps to)."""
    n = x.shape[0]
    bg = -MEAN / STD
    pad = F.pad(x, (max_shift,) * 4, value=bg)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = pad[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
    return out


# --------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + idt)


class DigitsResNet(nn.Module):
    def __init__(self, num_classes=10, widths=(32, 64, 128)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.stage1 = BasicBlock(widths[0], widths[0], stride=1)
        self.stage2 = BasicBlock(widths[0], widths[1], stride=2)
        self.stage3 = BasicBlock(widths[1], widths[2], stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)

    def forward(self, x):
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def conv_macs(model: nn.Module, shape=(1, 1, 32, 32)) -> int:
    """Multiply-accumulates of the Conv/Linear layers for one image."""
    total = 0

    def hook(m, inp, out):
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += m.in_features * m.out_features

    hs = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in hs:
        h.remove()
    return total


@torch.no_grad()
def accuracy(model, x, y, batch=256):
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(y)


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="train the digits example model")
    ap.add_argument("--epochs", type=int, default=EPOCHS)
    ap.add_argument("--out", default=HERE)
    args = ap.parse_args(argv)

    torch.manual_seed(TRAIN_SEED)
    np.random.seed(TRAIN_SEED)
    splits = load_splits()
    xtr, ytr = splits["train"]
    print("split sizes: " + ", ".join(f"{k}={len(v[1])}" for k, v in splits.items()), flush=True)

    model = DigitsResNet()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params={n_params}  MACs/image={conv_macs(model) / 1e6:.1f}M", flush=True)

    g = torch.Generator().manual_seed(TRAIN_SEED)
    steps_per_epoch = (len(ytr) + BATCH - 1) // BATCH
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=args.epochs * steps_per_epoch, pct_start=0.2
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.05)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(ytr), generator=g)
        tot = 0.0
        for i in range(0, len(ytr), BATCH):
            idx = perm[i:i + BATCH]
            xb = random_shift(xtr[idx], g)
            loss = loss_fn(model(xb), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(idx)
        calib_acc = accuracy(model, *splits["calib"])
        print(f"epoch {epoch + 1:2d}/{args.epochs} loss={tot / len(ytr):.4f} "
              f"calib_acc={calib_acc:.4f} t={time.time() - t0:.0f}s", flush=True)
    model.eval()
    torch_acc = {k: accuracy(model, *v) for k, v in splits.items()}
    print("torch accuracy: " + ", ".join(f"{k}={a:.4f}" for k, a in torch_acc.items()), flush=True)

    os.makedirs(args.out, exist_ok=True)
    onnx_path = os.path.join(args.out, "digits_resnet.onnx")
    torch.onnx.export(
        model, splits["test"][0][:1], onnx_path,
        dynamo=False,
        opset_version=OPSET,
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    for name in ("test", "calib"):
        x, y = splits[name]
        np.savez_compressed(
            os.path.join(args.out, f"digits_{name}.npz"),
            input=x.numpy().astype(np.float32), labels=y.numpy().astype(np.int64),
        )

    # verify with onnxruntime on the saved test split
    sess = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    data = np.load(os.path.join(args.out, "digits_test.npz"))
    logits = sess.run(["logits"], {"input": data["input"]})[0]
    onnx_acc = float((logits.argmax(1) == data["labels"]).mean())
    with torch.no_grad():
        ref = model(torch.from_numpy(data["input"])).numpy()
    err = float(np.abs(ref - logits).max())
    print(f"onnx test accuracy={onnx_acc:.4f} ({int(round(onnx_acc * len(data['labels'])))}/"
          f"{len(data['labels'])})  max|onnx-torch|={err:.2e}  params={n_params}", flush=True)
    for f in ("digits_resnet.onnx", "digits_test.npz", "digits_calib.npz"):
        print(f"  {f}: {os.path.getsize(os.path.join(args.out, f)) / 1024:.1f} KB")
    if onnx_acc < 0.97 or err > 1e-3:
        print("WARNING: accuracy below 97% or onnx/torch mismatch", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
