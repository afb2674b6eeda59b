"""The real-model sweep: `onnxprune analyze` and `onnxprune prune --target-flops 0.3` on every
ONNX file of the real-weights zoo (../shared/realzoo), and the pruned model's fidelity to the
dense one on realistic inputs.

    python benchmarks/real_zoo.py [--zoo DIR] [--only id,id/stem,...] [--timeout 600] [--json FILE]

Without --zoo the zoo is fetched (or found in its cache) by ../shared/realzoo/fetch.py,
relative to the repository. Each model gets, each in a fresh process with the installed CLI
(`python -m onnxprune`):

1. `onnxprune analyze MODEL`;
2. `onnxprune prune MODEL OUT --target-flops 0.3 --report REPORT.json` (no other option;
   --report only writes the numbers below);
3. when a model was written, a fidelity worker (this script, `--fidelity-worker`) that runs
   the dense and the pruned model on the inputs of `realzoo_inputs.py` (real kind: rendered
   pages, captchas, photos, man-page text, speech, real files...).

Status of a model:
* pruned: exit 0 and an output no larger than the input;
* refused: a clean, named refusal (an `onnxprune: error:` message, exit 3, 5, 6, 7 or 8,
  no traceback); the cause is the message's first line;
* failed: anything else (a traceback, exit 1 or 4, a signal, the timeout, a missing or
  larger output); the cause is the exit code and the traceback's last line.

Measured: prune wall time; peak RSS of the prune process (`ru_maxrss` from os.wait4 on that
child alone: its own peak, children it waited for included); params and FLOPs before/after
(the report's `before`/`after`); file size before/after (model + its external data files);
per output, the cosine similarity (per sample, flattened, averaged) and the relative L2 error
||pruned - dense|| / ||dense|| (per sample, averaged), or the share of equal elements for
integer outputs; and the task metric of the model's input maker (top-1 agreement, decoded
text agreement, boxes matched at IoU 0.5, tag agreement...), or "cosine/relL2 only".

Optional packages for the inputs (a missing one makes that model's fidelity "n/a (needs X)"):
pillow, captcha, python-barcode, scikit-image (its bundled photos), tokenizers; Debian:
espeak-ng, fonts-dejavu-core, manpages-zh (the Chinese man pages bigru-lac reads).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FETCH = ROOT.parent / "shared" / "realzoo" / "fetch.py"
TARGET_FLOPS = "0.3"
REFUSAL_CODES = {3, 5, 6, 7, 8}  # onnxprune.errors: load/unsupported, plan, output, data, provider


# -- the zoo ----------------------------------------------------------------------------------

def zoo_files(zoo: Path | None, only: set[str]) -> list[tuple[str, str, Path]]:
    """(model id, row key, path) of every ONNX file; the key is `id/stem` when an id has several."""
    if zoo is None:
        cmd = [sys.executable, str(FETCH)]
        ids = sorted({key.split("/")[0] for key in only})
        if ids:
            cmd += ["--only", ",".join(ids)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        pairs = [(line.split(None, 1)[0], Path(line.split(None, 1)[1].strip()))
                 for line in out.splitlines() if line.strip()]
    else:
        pairs = [(p.parent.name, p) for p in sorted(zoo.glob("*/*.onnx")) if p.parent.name != "wheels"]
    counts: dict[str, int] = {}
    for model_id, _ in pairs:
        counts[model_id] = counts.get(model_id, 0) + 1
    files = []
    for model_id, path in pairs:
        key = model_id if counts[model_id] == 1 else f"{model_id}/{path.stem}"
        if not only or model_id in only or key in only:
            files.append((model_id, key, path))
    return files


def external_data_files(path: Path) -> list[Path]:
    """The files an ONNX model's initializers point to (external data), beside it."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node for a in n.attribute if a.HasField("t")]
    names = {e.value for t in tensors if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return [path.parent / n for n in sorted(names)]


def model_bytes(path: Path) -> int:
    return path.stat().st_size + sum(f.stat().st_size for f in external_data_files(path) if f.exists())


# -- running the CLI --------------------------------------------------------------------------

def run_child(cmd: list[str], timeout: float, log_dir: Path, name: str) -> dict:
    """Run `cmd`; returns its exit code (None on timeout), wall seconds, peak RSS (MiB), stdout,
    stderr. os.wait4 gives this child's own rusage, so peaks do not mix across models."""
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    env = dict(os.environ, ONNXPRUNE_PROGRESS="0")
    start = time.perf_counter()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
                                start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - start > timeout:
                timed_out = True
                os.killpg(proc.pid, 9)  # the whole session: onnxruntime threads, workers
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.05)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keep Popen from waiting again
    return {"code": None if timed_out else proc.returncode, "wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024,
            "stdout": out_path.read_text(errors="replace"), "stderr": err_path.read_text(errors="replace")}


def last_traceback_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no output)"


def shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def classify(run: dict, timeout: float) -> tuple[str, str]:
    """(status, cause) of a finished CLI run, before looking at its output file."""
    code, stderr = run["code"], run["stderr"]
    if code is None:
        return "failed", f"timeout after {timeout:.0f} s"
    if code == 0:
        return "ok", ""
    message = re.search(r"^onnxprune: error: (.*)$", stderr, re.M)
    if code in REFUSAL_CODES and message and "Traceback" not in stderr:
        # the first line is often generic ("no group is prunable"): add the first reason given
        why = re.search(r"^Why:\s*\n\s*- (.*)$", stderr, re.M)
        reason = f" (why: {shorten(why.group(1), 140)})" if why else ""
        return "refused", f"exit {code}: {message.group(1).strip()}{reason}"
    if code < 0:
        return "failed", f"signal {-code}: {last_traceback_line(stderr)}"
    return "failed", f"exit {code}: {last_traceback_line(stderr)}"


def sweep_one(model_id: str, key: str, path: Path, zoo: Path, timeout: float) -> dict:
    py = [sys.executable, "-m", "onnxprune"]
    row: dict = {"model": key, "id": model_id, "file": str(path), "size_before": model_bytes(path)}
    with tempfile.TemporaryDirectory(prefix="real_zoo_") as tmp:
        tmp = Path(tmp)
        analyze = run_child(py + ["analyze", str(path)], timeout, tmp, "analyze")
        status, cause = classify(analyze, timeout)
        summary = re.search(r"(\d+) of (\d+) groups prunable", analyze["stdout"])
        row["analyze"] = (f"{summary.group(1)}/{summary.group(2)} groups" if status == "ok" and summary
                          else status if status == "ok" else f"{status}: {cause}")
        row["analyze_s"] = round(analyze["wall_s"], 2)

        out_dir = tmp / "out"
        out_dir.mkdir()
        out, report = out_dir / f"{path.stem}.pruned.onnx", tmp / "report.json"
        prune = run_child(py + ["prune", str(path), str(out), "--target-flops", TARGET_FLOPS,
                                "--report", str(report)], timeout, tmp, "prune")
        row["prune_s"] = round(prune["wall_s"], 2)
        row["peak_rss_mib"] = round(prune["peak_rss_mib"], 1)
        row["exit_code"] = prune["code"]
        status, cause = classify(prune, timeout)
        if report.exists():
            rep = json.loads(report.read_text())
            for side in ("before", "after"):
                row[f"params_{side}"] = rep[side]["params"]
                row[f"flops_{side}"] = rep[side]["flops"]
        if status == "ok":
            if not out.exists():
                status, cause = "failed", "exit 0 but no output model written"
            else:
                row["size_after"] = sum(f.stat().st_size for f in out_dir.iterdir())
                if row["size_after"] > row["size_before"]:
                    status, cause = "failed", (f"pruned output larger than its input "
                                               f"({row['size_after']} > {row['size_before']} bytes)")
                else:
                    status = "pruned"
        row["status"], row["cause"] = status, cause
        if status in ("refused", "failed"):  # the whole message stays in the JSON
            row["stderr_tail"] = "\n".join(prune["stderr"].strip().splitlines()[-30:])
        if status == "pruned":
            result = tmp / "fidelity.json"
            worker = run_child([sys.executable, str(Path(__file__).resolve()), "--fidelity-worker", model_id,
                                str(path), str(out), str(zoo), str(result)], timeout, tmp, "fidelity")
            if result.exists():
                row["fidelity"] = json.loads(result.read_text())
            else:
                wstatus, wcause = classify(worker, timeout)
                row["fidelity"] = {"error": wcause or "no result"}
    return row


# -- fidelity (runs in its own process) ------------------------------------------------------

def compare_outputs(names: list[str], dense: list[list], pruned: list[list]) -> dict[str, dict]:
    """Per output: cosine and relative L2 per sample (flattened), averaged; equal-element share
    for integer outputs; a note when the shapes differ."""
    import numpy as np
    per_output = {}
    for k, name in enumerate(names):
        cos, rel, equal, note = [], [], [], ""
        for d_out, p_out in zip(dense, pruned):
            d, p = np.asarray(d_out[k]), np.asarray(p_out[k])
            if d.shape != p.shape:
                note = f"shape {list(p.shape)} vs dense {list(d.shape)}"
                continue
            if not np.issubdtype(d.dtype, np.floating):
                equal.append(float((d == p).mean()))
                continue
            d, p = d.astype(np.float64).ravel(), p.astype(np.float64).ravel()
            nd, np_ = np.linalg.norm(d), np.linalg.norm(p)
            cos.append(float(d @ p / (nd * np_)) if nd and np_ else float(nd == np_))
            rel.append(float(np.linalg.norm(p - d) / nd) if nd else float(np.linalg.norm(p)))
        entry = {}
        if cos:
            entry.update(cosine=float(np.mean(cos)), rel_l2=float(np.mean(rel)))
        if equal:
            entry["equal"] = float(np.mean(equal))
        if note:
            entry["note"] = note
        per_output[name] = entry
    return per_output


def fidelity_worker(model_id: str, dense_path: Path, pruned_path: Path, zoo: Path, result: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    sys.path.insert(0, str(HERE))
    from realzoo_inputs import Context, MissingDependency, maker_for

    make = maker_for(model_id, dense_path)
    if make is None:
        result.write_text(json.dumps({"na": "no input maker for this model"}))
        return
    try:
        inputs = make(Context(model=dense_path, zoo=zoo))
    except MissingDependency as exc:
        result.write_text(json.dumps({"na": f"needs {exc}"}))
        return
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # a shared 2-core machine
    dense = ort.InferenceSession(str(dense_path), opts, providers=["CPUExecutionProvider"])
    pruned = ort.InferenceSession(str(pruned_path), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in dense.get_outputs()]
    d_out = [dense.run(names, feed) for feed in inputs.feeds]
    p_out = [pruned.run(names, feed) for feed in inputs.feeds]
    report = {"samples": len(inputs.feeds), "inputs": inputs.note,
              "outputs": compare_outputs(names, d_out, p_out)}
    if inputs.agree is not None:
        try:
            report["task"] = inputs.agree(d_out, p_out)
        except Exception as exc:  # a decoder that cannot read an output: report, keep the rest
            report["task_error"] = f"{type(exc).__name__}: {exc}"
    result.write_text(json.dumps(report, default=lambda x: float(np.asarray(x))))


def onnxprune_revision() -> str:
    """The commit the sweep ran on, and whether onnxprune/ had uncommitted changes."""
    git = ["git", "-C", str(ROOT)]
    try:
        head = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(git + ["status", "--porcelain", "onnxprune"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes in onnxprune/" if dirty.strip() else "")


# -- the table --------------------------------------------------------------------------------

def human(n: float | None) -> str:
    if n is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def before_after(row: dict, key: str, fmt=human) -> str:
    before, after = row.get(f"{key}_before"), row.get(f"{key}_after")
    if before is None:
        return ""
    if after is None:
        return fmt(before)
    return f"{fmt(before)} → {fmt(after)} (-{(1 - after / before) * 100:.0f}%)" if before else fmt(before)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def fidelity_cells(row: dict) -> tuple[str, str, str]:
    """(cosine, relative L2, task) cells."""
    fid = row.get("fidelity")
    if fid is None:
        return "", "", ""
    if "na" in fid or "error" in fid:
        text = f"n/a ({fid['na']})" if "na" in fid else f"error: {fid['error']}"
        return text, "", ""
    outs = list(fid["outputs"].values())

    def cell(metric: str) -> str:
        values = [o[metric] for o in outs if metric in o]
        if not values:
            return ""
        if len(outs) <= 3:
            return ", ".join(f"{v:.3f}" for v in values)
        return f"{min(values):.3f}–{max(values):.3f} ({len(values)} outputs)"
    cos, rel = cell("cosine"), cell("rel_l2")
    equal = [o["equal"] for o in outs if "equal" in o]
    if equal:
        cos = (cos + "; " if cos else "") + "int equal " + ", ".join(f"{v:.3f}" for v in equal)
    notes = [o["note"] for o in outs if "note" in o]
    if notes:
        cos = (cos + "; " if cos else "") + "; ".join(notes)
    task = fid.get("task")
    if task:
        task_text = ", ".join(f"{k} {v:.3f}" if k not in ("dense_boxes", "pruned_boxes") else f"{k} {v:.0f}"
                              for k, v in task.items())
    else:
        task_text = fid.get("task_error", "cosine/relL2 only")
    return cos, rel, task_text


def markdown(rows: list[dict]) -> str:
    header = ["model", "status", "cause", "analyze", "prune s", "peak RSS MiB", "params", "FLOPs",
              "size MiB", "cosine", "rel L2", "task agreement (pruned vs dense)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in rows:
        size = mib(r["size_before"]) + (f" → {mib(r['size_after'])}" if "size_after" in r else "")
        cos, rel, task = fidelity_cells(r)
        cells = [r["model"], r["status"], r["cause"], r["analyze"], f"{r['prune_s']:.1f}",
                 f"{r['peak_rss_mib']:.0f}", before_after(r, "params"), before_after(r, "flops"), size, cos, rel, task]
        lines.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--fidelity-worker":
        model_id, dense, pruned, zoo, result = sys.argv[2:7]
        fidelity_worker(model_id, Path(dense), Path(pruned), Path(zoo), Path(result))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, help="a fetched zoo folder (<id>/<file>.onnx, wheels/)")
    parser.add_argument("--only", default="", help="comma-separated ids or id/stem keys")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per command and model (600)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    files = zoo_files(args.zoo, only)
    if not files:
        raise SystemExit(f"no ONNX file matches --only {args.only}")
    zoo = args.zoo or files[0][2].parent.parent
    revision = onnxprune_revision()
    rows = []
    for model_id, key, path in files:
        print(f"{key} ...", file=sys.stderr, flush=True)
        try:
            row = sweep_one(model_id, key, path, zoo, args.timeout)
        except Exception as exc:  # the sweep itself must go on to the next model
            row = {"model": key, "id": model_id, "file": str(path), "status": "failed", "analyze": "",
                   "cause": f"benchmark error: {type(exc).__name__}: {exc}", "prune_s": 0.0, "peak_rss_mib": 0.0,
                   "size_before": path.stat().st_size}
        rows.append(row)
        print(f"  {row['status']} {row['cause']}".rstrip(), file=sys.stderr, flush=True)
    import onnxruntime
    print(f"`onnxprune prune MODEL OUT --target-flops {TARGET_FLOPS}` per ONNX file of the real zoo, "
          f"fresh process each; onnxprune {revision}, onnxruntime {onnxruntime.__version__}; peak RSS = "
          f"ru_maxrss of the prune process (os.wait4).\n")
    print(markdown(rows))
    counts = {s: sum(r["status"] == s for r in rows) for s in ("pruned", "refused", "failed")}
    print(f"\n{counts['pruned']} pruned, {counts['refused']} refused, {counts['failed']} failed "
          f"of {len(rows)} files.")
    if args.json:
        args.json.write_text(json.dumps({"command": f"prune MODEL OUT --target-flops {TARGET_FLOPS}",
                                         "onnxprune": revision, "onnxruntime": onnxruntime.__version__,
                                         "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
