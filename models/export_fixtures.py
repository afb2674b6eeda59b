#!/usr/bin/env python
"""Export the small CNN test fixtures in ``models/fixtures/``.

Each architecture below is built in PyTorch with a fixed seed, given
non-trivial random weights (convolution / linear weights *and* every
BatchNorm's weight, bias, running_mean and running_var, so that no BN is an
identity), put in ``eval()`` mode and exported twice:

* ``<name>_legacy.onnx`` -- the TorchScript exporter (``dynamo=False``),
  opset 13, input ``input`` / output ``output``, dynamic batch axis;
  all weights stored inside the ``.onnx`` file.  Note that this exporter
  folds every eval-mode BatchNorm into the preceding Conv.
* ``<name>_legacy_bn.onnx`` (only for the models in ``BN_VARIANTS``) -- the
  same legacy export with ``do_constant_folding=False``, which keeps explicit
  ``BatchNormalization`` nodes (as models from other converters have).
* ``<name>_dynamo.onnx`` + ``<name>_dynamo.onnx.data`` -- the
  ``torch.export``-based exporter (``dynamo=True``) with its default opset
  and a dynamic batch dimension, weights in the external ``.data`` file so
  the fixtures exercise the external-data code path.  As written by the
  exporter the weights above its size threshold are external while small
  tensors (e.g. biases, int64 shape/axes constants) stay inline -- a mixed
  model, kept as is.  Only if the exporter wrote no external data at all is
  every float initializer moved out (``_force_external``).

Every written file is checked with onnxruntime against the PyTorch output
(max abs error < 1e-4, at batch 1 and batch 3), and one line per file is
printed: name, opset, size, op-type counts.  A failure of one exporter for one
model is reported and the script continues; the exit status is non-zero if
anything failed.

Only needed to regenerate the fixtures (not by the package or its tests)::

    pip install torch onnxscript      # CPU build is enough
    python models/export_fixtures.py [--only resnet,vgg] [--out DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import traceback

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

torch.set_num_threads(1)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "fixtures")
LEGACY_OPSET = 13
# models also exported with explicit BatchNormalization nodes
BN_VARIANTS = ("resnet", "mobilenet")
ATOL = 1e-4


# --------------------------------------------------------------------------
# Architectures
# --------------------------------------------------------------------------


def conv_bn(cin, cout, k=3, stride=1, groups=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    )


class BasicBlock(nn.Module):
    """ResNet basic block; 1x1 conv+bn downsample shortcut when shapes change."""

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


class ResNet(nn.Module):
    """conv-bn-relu stem, identity BasicBlock, stride-2 BasicBlock with
    downsample shortcut, global average pool, flatten, Linear."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = BasicBlock(16, 16)
        self.layer2 = BasicBlock(16, 32, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class SqueezeExcite(nn.Module):
    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, c // r, 1)
        self.act = nn.ReLU()
        self.fc2 = nn.Conv2d(c // r, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        s = self.gate(self.fc2(self.act(self.fc1(self.pool(x)))))
        return x * s


class InvertedResidual(nn.Module):
    """1x1 expand conv-bn-act, depthwise 3x3 conv-bn-act, SE, 1x1 project
    conv-bn, residual add when stride 1 and cin == cout."""

    def __init__(self, cin, cout, expand, stride=1, act=nn.ReLU6, se=True):
        super().__init__()
        hid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), act())
        self.dw = nn.Sequential(
            nn.Conv2d(hid, hid, 3, stride=stride, padding=1, groups=hid, bias=False),
            nn.BatchNorm2d(hid),
            act(),
        )
        self.se = SqueezeExcite(hid) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.use_res = stride == 1 and cin == cout

    def forward(self, x):
        out = self.project(self.se(self.dw(self.expand(x))))
        return x + out if self.use_res else out


class MobileNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        # residual block (16 -> 16, stride 1) with ReLU6 + SE
        self.block1 = InvertedResidual(16, 16, expand=3, stride=1, act=nn.ReLU6, se=True)
        # downsampling block (16 -> 24, stride 2) with Hardswish + SE, no residual
        self.block2 = InvertedResidual(16, 24, expand=2, stride=2, act=nn.Hardswish, se=True)
        # residual block (24 -> 24) without SE
        self.block3 = InvertedResidual(24, 24, expand=2, stride=1, act=nn.ReLU6, se=False)
        self.head = nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = self.head(self.block3(self.block2(self.block1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class Inception(nn.Module):
    """stem conv, 3 parallel branches (1x1 / 1x1->3x3 / maxpool->1x1)
    concatenated on channels, a conv consuming the concat, pool, Linear."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(24, 16, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.b2 = nn.Sequential(
            nn.Conv2d(24, 12, 1, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
            nn.Conv2d(12, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU(),
        )
        self.b3 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            nn.Conv2d(24, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.post = nn.Sequential(nn.Conv2d(16 + 24 + 8, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([self.b1(x), self.b2(x), self.b3(x)], dim=1)
        x = self.post(x)
        return self.fc(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    """conv-relu-maxpool x3 (32 -> 16 -> 8 -> 4), flatten of the 4x4 map into
    Linear(C*16, 64) -> ReLU -> Dropout -> Linear(64, 10)."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 24, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Dropout(0.5), nn.Linear(64, num_classes)
        )

    def forward(self, x):
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def channel_shuffle(x, groups):
    b, c, h, w = x.size()
    x = x.view(b, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(b, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2 stride-1 unit: chunk, branch on x2, cat, channel shuffle."""

    def __init__(self, c):
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half, bias=False), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(),
        )

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=1)
        out = torch.cat((x1, self.branch(x2)), 1)
        return channel_shuffle(out, 2)


class ShuffleNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24), nn.ReLU())
        self.unit1 = ShuffleUnit(24)
        # grouped (not depthwise) conv: 24 -> 32 channels, groups=4
        self.gconv = nn.Sequential(nn.Conv2d(24, 32, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.unit2 = ShuffleUnit(32)
        self.head = nn.Sequential(nn.Conv2d(32, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.head(self.unit2(self.gconv(self.unit1(self.stem(x)))))
        return self.fc(torch.flatten(self.pool(x), 1))


class UNetLite(nn.Module):
    """enc conv (32x32) -> strided conv (16x16) -> conv -> nearest Upsample x2
    -> Concat with the skip -> conv -> per-pixel 1x1 conv head (3 classes,
    output N x 3 x 32 x 32, no pooling)."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec = nn.Sequential(nn.Conv2d(32 + 16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        s = self.enc1(x)
        y = self.mid(self.down(s))
        y = torch.cat([self.up(y), s], dim=1)
        return self.head(self.dec(y))


MODELS = {
    "resnet": ResNet,
    "mobilenet": MobileNet,
    "inception": Inception,
    "vgg": VGG,
    "shufflenet": ShuffleNet,
    "unet_lite": UNetLite,
}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def randomise(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic, non-trivial weights. BN statistics and affine params
    are randomised too so that no BatchNorm is the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.0 + 0.5)   # [0.5, 1.5)
                m.bias.copy_(torch.randn(n, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)  # [0.5, 2.0)
    return model.eval()


def file_size(path: str) -> int:
    size = os.path.getsize(path)
    data = path + ".data"
    if os.path.exists(data):
        size += os.path.getsize(data)
    return size


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    c = collections.Counter(n.op_type for n in model.graph.node)
    return dict(sorted(c.items()))


def has_external_data(model: onnx.ModelProto) -> tuple[int, int]:
    ext = sum(1 for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    return ext, len(model.graph.initializer)


def verify(path: str, model: nn.Module, in_shape, seed: int) -> float:
    """Compare ORT vs PyTorch at batch 1 and batch 3; return max abs err."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    in_name = sess.get_inputs()[0].name
    g = torch.Generator().manual_seed(seed + 1000)
    worst = 0.0
    for batch in (1, 3):
        x = torch.randn((batch, *in_shape[1:]), generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {in_name: x.numpy()})[0]
        if got.shape != ref.shape:
            raise AssertionError(f"shape mismatch at batch {batch}: onnx {got.shape} vs torch {ref.shape}")
        worst = max(worst, float(np.max(np.abs(got - ref))))
    if not worst < ATOL:
        raise AssertionError(f"max abs err {worst:.3g} >= {ATOL}")
    return worst


def report(name: str, path: str, err: float, note: str = "") -> None:
    m = onnx.load(path, load_external_data=False)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    ext, total = has_external_data(m)
    counts = " ".join(f"{k}:{v}" for k, v in op_counts(m).items())
    print(
        f"{os.path.basename(path):28s} opset={opset} size={file_size(path) / 1024:.1f}KB "
        f"ext_init={ext}/{total} err={err:.1e}{note}\n    ops: {counts}",
        flush=True,
    )


def export_legacy(model, x, path, fold=True):
    torch.onnx.export(
        model, x, path,
        dynamo=False,
        do_constant_folding=fold,
        opset_version=LEGACY_OPSET,
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )


def _force_external(path: str) -> None:
    """Re-save with every floating-point initializer in <basename>.data.

    Integer tensors (Reshape shapes, ReduceMean axes, Resize scales/sizes...)
    stay inline: onnxruntime 1.31 refuses to load a model whose shape-like
    constant inputs live in external data ("[ShapeInferenceError] Cannot parse
    data from external tensors").
    """
    from onnx.external_data_helper import set_external_data

    m = onnx.load(path)  # pulls in any external data already written
    data_name = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(path), data_name)
    if os.path.exists(data_path):
        os.remove(data_path)  # onnx appends to an existing data file
    for t in m.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
            if not t.HasField("raw_data"):
                t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t), t.name))
            set_external_data(t, location=data_name)
    onnx.save_model(m, path)  # writes tensors marked external to data_name


def export_dynamo(model, x, path) -> str:
    """Returns a note on the shape mode used."""
    for f in (path, path + ".data"):
        if os.path.exists(f):
            os.remove(f)
    batch = torch.export.Dim("batch", min=1, max=1024)
    note = " dyn-batch"
    try:
        prog = torch.onnx.export(
            model, (x,), path,
            dynamo=True,
            external_data=True,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: batch},),
        )
    except Exception as e:  # fall back to a static export
        print(f"  [{os.path.basename(path)}] dynamic batch failed ({type(e).__name__}: {e}); exporting static", flush=True)
        note = " STATIC"
        prog = torch.onnx.export(
            model, (x,), path, dynamo=True, external_data=True,
            input_names=["input"], output_names=["output"],
        )
    del prog
    m = onnx.load(path, load_external_data=False)
    ext, total = has_external_data(m)
    extra = [f for f in os.listdir(os.path.dirname(path))
             if f.startswith(os.path.basename(path)) and f != os.path.basename(path)
             and f != os.path.basename(path) + ".data"]
    if ext == 0 or extra or not os.path.exists(path + ".data"):
        # the exporter kept everything inline (or used another file name)
        _force_external(path)
        note += " (external data forced)"
    onnx.checker.check_model(path)
    return note


# --------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ",".join(MODELS))
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    names = [n for n in args.only.split(",") if n] or list(MODELS)

    print(f"torch {torch.__version__}  onnx {onnx.__version__}  onnxruntime {ort.__version__}", flush=True)
    failures = []
    for idx, name in enumerate(names):
        seed = 1234 + idx * 17
        torch.manual_seed(seed)
        model = randomise(MODELS[name](), seed)
        in_shape = (1, 3, 32, 32)
        x = torch.randn(in_shape, generator=torch.Generator().manual_seed(seed))
        kinds = ["legacy", "dynamo"] + (["legacy_bn"] if name in BN_VARIANTS else [])
        for kind in kinds:
            path = os.path.join(args.out, f"{name}_{kind}.onnx")
            try:
                if kind == "legacy":
                    export_legacy(model, x, path)
                    note = ""
                elif kind == "legacy_bn":
                    export_legacy(model, x, path, fold=False)
                    note = ""
                else:
                    # batch 2 for tracing so torch.export does not specialise
                    # the dynamic batch dim to the value 1
                    note = export_dynamo(model, x.repeat(2, 1, 1, 1), path)
                err = verify(path, model, in_shape, seed)
                report(name, path, err, note)
            except Exception as e:
                failures.append(f"{name}_{kind}")
                print(f"FAILED {name}_{kind}: {type(e).__name__}: {e}", flush=True)
                traceback.print_exc()
    # tidy stray artefacts some exporter versions leave behind
    for f in os.listdir(args.out):
        if f.endswith((".md", ".sarif")) and f.startswith("onnx_export"):
            os.remove(os.path.join(args.out, f))
    if failures:
        print("FAILURES: " + ", ".join(failures))
        return 1
    print(f"all {sum(3 if n in BN_VARIANTS else 2 for n in names)} exports verified (max abs err < {ATOL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
