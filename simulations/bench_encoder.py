"""Benchmark (c): encoder throughput (texts/s) and the vector cache's hit rate.

    python -m simulations.bench_encoder [--domain amazon2014-office] [--limit 3000]

Run 1 encodes a domain's item texts into an empty cache; run 2 (a new encoder
and cache object, as a new process would have) finds every text in the cache.
Also compares dynamic padding with padding every batch to 128 tokens.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shared.data.readers import read_domain
from shared.encoder import TextEncoder
from shared.vector_cache import VectorCache, encode_texts
from simulations.common import add_domain_flag, add_out_flag, machine, real_domain, write_json


class FixedPaddingEncoder(TextEncoder):
    """The encoder with every batch padded to ``max_length`` tokens, as a fixed-shape encoder would."""

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    add_domain_flag(parser, "amazon2014-office")
    parser.add_argument("--limit", type=int, default=3000, help="texts to encode (default: 3000)")
    add_out_flag(parser, "runs/bench-encoder")
    args = parser.parse_args()
    texts = read_domain(real_domain(args.domain)).items["text"].tolist()[: args.limit]
    tokens = [len(t) for t in TextEncoder().tokenizer(texts, truncation=True, max_length=256)["input_ids"]]
    results: dict[str, object] = {"domain": args.domain, "texts": len(texts), "mean_tokens": float(np.mean(tokens)), "machine": machine()}
    with tempfile.TemporaryDirectory() as tmp:
        for run in (1, 2):
            encoder = TextEncoder()
            t0 = time.perf_counter()
            _, stats = encode_texts(texts, encoder=encoder, cache=VectorCache(Path(tmp)), progress=False)
            seconds = time.perf_counter() - t0
            results[f"run{run}"] = {
                "seconds": round(seconds, 2),
                "encoded": stats.encoded,
                "hit_rate": stats.hit_rate,
                "texts_per_s": round(len(texts) / seconds, 1),
            }
    # Fixed padding for comparison: every batch padded to 128 tokens.
    sample = texts[:500]
    dynamic_encoder, fixed_encoder = TextEncoder(max_length=128), FixedPaddingEncoder(max_length=128)
    t0 = time.perf_counter()
    dynamic_encoder.encode(sample)
    dynamic = time.perf_counter() - t0
    t0 = time.perf_counter()
    fixed_encoder.encode(sample)
    fixed = time.perf_counter() - t0
    results["padding"] = {
        "texts": len(sample),
        "dynamic_s": round(dynamic, 2),
        "fixed_128_s": round(fixed, 2),
        "speedup": round(fixed / dynamic, 2),
    }
    r1, r2 = results["run1"], results["run2"]
    print(f"\n{args.domain}: {len(texts):,} item texts, {results['mean_tokens']:.0f} tokens on average; {machine()}")
    print(f"run 1 (empty cache): {r1['texts_per_s']:>9,.1f} texts/s, {r1['encoded']:,} encoded, hit rate {r1['hit_rate']:.0%}")  # type: ignore[index]
    print(f"run 2 (warm cache):  {r2['texts_per_s']:>9,.1f} texts/s, {r2['encoded']:,} encoded, hit rate {r2['hit_rate']:.0%}")  # type: ignore[index]
    print(f"dynamic padding vs padding to 128 tokens on {len(sample)} texts: {dynamic:.1f} s vs {fixed:.1f} s ({fixed / dynamic:.1f}x)")
    write_json(Path(args.out) / "benchmark.json", results)


if __name__ == "__main__":
    main()
