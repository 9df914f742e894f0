"""onnxruntime CPU latency of Llama-style decoders as exported and as ``onnxopt --target ort`` leaves them.

The corpus has no rotary decoder; this measures what the rotary and attention fusions give one. Each model is a
``LlamaModel`` with random, seeded weights (hidden 512, 4 layers, 8 query heads, intermediate 1376, vocabulary
1000), once with 8 key/value heads and once with 2 (grouped-query attention), exported by the TorchScript exporter
(opset 17) and the dynamo exporter (its default opset), with dynamic batch and sequence. Variants, each
optimized by the onnxopt CLI with verification on:

* ``original``: the export;
* ``ort, no contrib rotary``: ``-O3 --target ort`` with ``contrib_rotary_embedding`` switched off;
* ``ort``: ``-O3 --target ort`` (com.microsoft.RotaryEmbedding at the model's own opset);
* ``ort, opset 23``: ``-O3 --target ort --upgrade-opset 23`` (the standard RotaryEmbedding and Attention).

All run in one process under ORT_ENABLE_ALL with 1 intra-op thread, batch 1, sequence 128, taking turns over
``--rounds`` rounds; the table gives the median and the ratio to the original, and the largest output
difference against the original (optimizations on for both, so it includes onnxruntime's own rounding).

    python benchmarks/decoder_latency.py            # needs torch and transformers (benchmarks/requirements.txt)
    python benchmarks/decoder_latency.py --rounds 30 --onnxopt /path/to/onnxopt
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WORK = HERE / "work" / "decoders"
FIXTURES = HERE.parent / "tests" / "fixtures"

VOCABULARY = 1000
SEQUENCE = 128
TORCHSCRIPT_OPSET = 17
NO_CONTRIB_ROTARY = ("fold,cse,fuse,attention,"
                     "ort_fuse{disable=contrib_rotary_embedding+contrib_rotary_embedding_partial},dce")
VARIANTS = {
    "ort, no contrib rotary": ["--passes", NO_CONTRIB_ROTARY, "--target", "ort"],
    "ort": ["-O3", "--target", "ort"],
    "ort, opset 23": ["-O3", "--target", "ort", "--upgrade-opset", "23"],
}


def export_models() -> list[Path]:
    """The four exports (8 and 2 key/value heads, two exporters), built once into ``work/decoders``."""
    sys.path.insert(0, str(FIXTURES))
    from export_common import export, positional, randomized, seed_everything

    WORK.mkdir(parents=True, exist_ok=True)
    paths = []
    for kv_heads in (8, 2):
        for exporter, opset in (("torchscript", TORCHSCRIPT_OPSET), ("dynamo", None)):
            path = WORK / f"llama_kv{kv_heads}_{exporter}.onnx"
            paths.append(path)
            if path.exists():
                continue
            import torch
            from transformers import LlamaConfig, LlamaModel

            seed_everything()
            config = LlamaConfig(vocab_size=VOCABULARY, hidden_size=512, intermediate_size=1376, num_hidden_layers=4,
                                 num_attention_heads=8, num_key_value_heads=kv_heads, max_position_embeddings=512,
                                 attn_implementation="eager")
            model = randomized(LlamaModel(config).eval(), 0.02)
            inputs = {"input_ids": torch.randint(0, VOCABULARY, (2, 16)),
                      "attention_mask": torch.ones(2, 16, dtype=torch.long)}
            axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
            print(f"exporting {path.name} ...", flush=True)
            export(positional(model, list(inputs), use_cache=False), inputs, ["last_hidden_state"], axes, path,
                   exporter, opset)
    return paths


def optimize(cli: str, source: Path) -> dict[str, Path]:
    variants = {"original": source}
    for name, flags in VARIANTS.items():
        target = WORK / f"{source.stem}.{name.replace(', ', '_').replace(' ', '_')}.onnx"
        subprocess.run([cli, "run", str(source), "-o", str(target), "-q", *flags], check=True)
        variants[name] = target
    return variants


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure(variants: dict[str, Path], rounds: int) -> dict[str, dict]:
    sessions = {name: session(path) for name, path in variants.items()}
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, VOCABULARY, (1, SEQUENCE)).astype(np.int64),
             "attention_mask": np.ones((1, SEQUENCE), np.int64)}
    reference = sessions["original"].run(None, feeds)[0]
    results = {}
    for name, sess in sessions.items():
        output = sess.run(None, feeds)[0]
        results[name] = {"max_abs_diff": float(np.abs(output - reference).max()), "times": [],
                         "nodes": len(onnx.load(str(variants[name]), load_external_data=False).graph.node)}
    for round_index in range(rounds):
        order = list(sessions)[round_index % len(sessions):] + list(sessions)[:round_index % len(sessions)]
        for name in order:
            start = time.perf_counter()
            sessions[name].run(None, feeds)
            results[name]["times"].append(time.perf_counter() - start)
    base = float(np.median(results["original"]["times"]))
    for entry in results.values():
        entry["median_ms"] = float(np.median(entry["times"])) * 1e3
        entry["ratio"] = entry["median_ms"] / (base * 1e3)
    return results


def report(all_results: dict[str, dict[str, dict]], rounds: int) -> str:
    lines = ["# Llama-style decoders: onnxruntime CPU latency with onnxopt --target ort", "",
             f"Generated {time.strftime('%Y-%m-%dT%H:%M:%S%z')} by `python benchmarks/decoder_latency.py` "
             f"(onnxruntime {ort.__version__}, 1 thread, ORT_ENABLE_ALL, batch 1, sequence {SEQUENCE}, "
             f"{rounds} rounds taking turns). See the script's docstring for the models and variants.", "",
             "| model | variant | nodes | median ms | ratio to original | max abs diff |", "|---|---|---|---|---|---|"]
    for model, results in all_results.items():
        for name, entry in results.items():
            lines.append(f"| {model} | {name} | {entry['nodes']} | {entry['median_ms']:.2f} | {entry['ratio']:.3f} "
                         f"| {entry['max_abs_diff']:.1e} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="turns each variant takes (default 20)")
    parser.add_argument("--onnxopt", default=shutil.which("onnxopt") or "onnxopt", help="the onnxopt CLI")
    args = parser.parse_args()
    all_results = {}
    for source in export_models():
        print(f"measuring {source.stem} ...", flush=True)
        results = measure(optimize(args.onnxopt, source), args.rounds)
        all_results[source.stem] = results
        for name, entry in results.items():
            print(f"  {name:24s} {entry['nodes']:4d} nodes  {entry['median_ms']:7.2f} ms  {entry['ratio']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "decoder_latency.md").write_text(report(all_results, args.rounds))
    stored = {model: {name: {k: v for k, v in entry.items() if k != "times"} for name, entry in results.items()}
              for model, results in all_results.items()}
    (RESULTS / "decoder_latency.json").write_text(json.dumps(stored, indent=1))
    print(f"wrote {RESULTS / 'decoder_latency.md'}")


if __name__ == "__main__":
    main()
