"""Packing throughput: the Ray Data packer vs a straightforward single-process Python packer.

Corpus: ≥ 50 M characters of real text found on any machine with this project installed — the
Python standard library's sources, then the installed packages' sources, in sorted order, one
document per file. Both packers use the same tokenizer (byte-level BPE trained on the corpus's
first characters), write Parquet rows of the same length, and are timed end to end from files
on disk to Parquet on disk. The Ray packer runs on a local Ray instance started beforehand
(cluster start-up is not packing time).

    python bench/packing.py [--quick]     → bench/results/packing.json and a table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from llada_ray.config import PipelineConfig
from llada_ray.data.corpus import load_tokenizer, prepare_tokenizer
from llada_ray.data.pack import pack_pretraining
from llada_ray.storage import storage_root

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 2048


def gather_corpus(target: Path, min_chars: int) -> int:
    """Copy source files (stdlib first, then site-packages) into `target` until min_chars."""
    paths = sysconfig.get_paths()
    roots = [Path(paths["stdlib"]), Path(paths["purelib"])]
    chars = 0
    target.mkdir(parents=True)
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if root == roots[0] and "site-packages" in path.parts:
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if not text.strip():
                continue
            (target / f"{chars:012d}.py").write_text(text, encoding="utf-8")
            chars += len(text)
            if chars >= min_chars:
                return chars
    return chars


def single_process_pack(corpus: Path, tokenizer_dir: str, out: Path) -> dict:
    """Read → tokenize document by document → cut rows of SEQ_LEN → one Parquet file."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    started = time.perf_counter()
    stream: list[int] = []
    for path in sorted(corpus.iterdir()):
        stream += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        stream.append(eos)
    tokens = len(stream)
    rows = -(-tokens // SEQ_LEN)
    flat = np.full(rows * SEQ_LEN, pad, dtype=np.int32)
    flat[:tokens] = stream
    out.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": list(flat.reshape(rows, SEQ_LEN))}), out / "rows.parquet")
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "tokens": tokens,
        "rows": rows,
        "padding_fraction": (rows * SEQ_LEN - tokens) / (rows * SEQ_LEN),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a 10 M character corpus")
    args = parser.parse_args()
    min_chars = 10_000_000 if args.quick else 50_000_000

    work = Path(tempfile.mkdtemp(prefix="lr-bench-pack-"))
    try:
        corpus = work / "corpus"
        chars = gather_corpus(corpus, min_chars)
        cfg = PipelineConfig.model_validate(
            {
                "name": "bench",
                "tokenizer": {"source": "train", "vocab_size": 4096, "train_chars": 5_000_000},
                "data": {
                    "seq_len": SEQ_LEN,
                    "pretrain": [{"type": "files", "path": str(corpus), "format": "text"}],
                },
                "stages": [
                    {
                        "stage": "cpt",
                        "phases": [{"name": "b32", "block_size": 32, "tokens": 1, "lr": 1e-4}],
                    }
                ],
                "storage": {"root": str(work / "runs")},
            }
        )
        fs, root = storage_root(cfg.storage)
        run = f"{root}/bench"
        tokenizer_path = prepare_tokenizer(cfg, fs, run)
        assert load_tokenizer(fs, tokenizer_path).eos_token_id is not None

        baseline = single_process_pack(corpus, tokenizer_path, work / "baseline")
        print(f"single process: {baseline['tokens'] / baseline['seconds']:,.0f} tokens/s")

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        started = time.perf_counter()
        packed = pack_pretraining(cfg, fs, run, tokenizer_path)
        seconds = time.perf_counter() - started
        ray.shutdown()
        m = packed.manifest
        ours = {
            "seconds": seconds,
            "tokens": m["tokens"],
            "rows": m["rows"],
            "padding_fraction": m["padding_fraction"],
            "bad_rows": m["bad_rows"],
        }
        print(f"ray data:       {ours['tokens'] / seconds:,.0f} tokens/s")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    speedup = (ours["tokens"] / ours["seconds"]) / (baseline["tokens"] / baseline["seconds"])
    report = {
        "setup": {
            "corpus_chars": chars,
            "seq_len": SEQ_LEN,
            "cpus": os.cpu_count(),
            "documents": "one per source file (stdlib, then site-packages)",
        },
        "single_process": baseline | {"tokens_per_s": baseline["tokens"] / baseline["seconds"]},
        "ray_data": ours | {"tokens_per_s": ours["tokens"] / ours["seconds"]},
        "targets": {
            "ray_vs_single_process_tokens_per_s": {
                "value": round(speedup, 3),
                "goal": 1.8,
                "higher_is_better": True,
                "met": speedup >= 1.8,
                "note": "tokenizer-bound on 2 cores, so 2x is the ceiling; Ray's fixed costs "
                "(worker and actor start-up, a second pass for the tails, the write) take the rest",
            },
            "padding_fraction": {
                "value": ours["padding_fraction"],
                "goal": 0.005,
                "higher_is_better": False,
                "met": ours["padding_fraction"] <= 0.005,
            },
        },
    }
    out = ROOT / "bench" / "results" / "packing.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\ncorpus {chars:,} characters, rows of {SEQ_LEN} tokens")
    print(f"{'packer':<16}{'tokens':>14}{'seconds':>10}{'tokens/s':>12}{'padding':>10}")
    for name, r in [("single process", baseline), ("ray data", ours)]:
        print(
            f"{name:<16}{r['tokens']:>14,}{r['seconds']:>10.1f}"
            f"{r['tokens'] / r['seconds']:>12,.0f}{r['padding_fraction']:>10.4%}"
        )
    print(f"\n{'target':<40}{'value':>10}{'goal':>8}  met")
    for name, t in report["targets"].items():
        print(f"{name:<40}{t['value']:>10.4f}{t['goal']:>8}  {t['met']}")
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
