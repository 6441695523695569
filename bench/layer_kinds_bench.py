"""Prefix caching of models that are not all full attention: ``python -m bench.layer_kinds_bench``.

Four random-weight models of one size (8 layers, hidden 512, 2 KV heads of 64, built in code like
``model_runner_bench``'s): ``full`` (Llama, every layer full attention: the reference),
``gemma3`` (Gemma-3-style, sliding 512-token windows beside every third layer global),
``lfm2`` (LFM2-style, short-convolution layers beside 3 attention layers) and ``qwen35``
(Qwen3.5-style, gated delta-net linear attention in 6 of 8 layers). At 512 and 2048 tokens:

- ``cold``: time to first token (TTFT) of a prompt nothing shares, through ``Engine`` (lookup,
  full prefill: a recurrent model's prefill stops where its state is taken);
- ``no_cache``: plain transformers, one forward of the same prompt (what ``cold`` costs over it
  is the chunking and the lookup);
- ``warm``: TTFT of a prompt whose first ``n - 64`` tokens were warmed into memory (restore, then
  64 tokens prefilled);
- bytes stored per cached token (the warmed prefix's records, headers included) against the
  full-attention model's.

Figures are medians of paired, interleaved repetitions; ratios are taken within one repetition
(``warm / cold``, ``cold / no_cache``). Prints a markdown table and writes
``bench/results/layer_kinds.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    Lfm2Config,
    Lfm2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
)

from bench.model_runner_bench import _first_event_s, build_bench_model
from model_runner.cache_factory import StoreOptions, build_prefix_cache
from model_runner.engine import Engine
from model_runner.loading import LoadedModel, load_model

BLOCK = 64
SUFFIX = 64
RESULTS = Path(__file__).resolve().parent / "results" / "layer_kinds.json"

_SIX_LINEAR = ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"]
MODELS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "full": (LlamaConfig, LlamaForCausalLM, {}),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        {
            "head_dim": 64,
            "sliding_window": 512,
            "layer_types": (["sliding_attention"] * 2 + ["full_attention"]) * 2 + ["sliding_attention"] * 2,
        },
    ),
    "lfm2": (
        Lfm2Config,
        Lfm2ForCausalLM,
        {"layer_types": ["conv", "conv", "full_attention"] * 2 + ["conv", "full_attention"]},
    ),
    "qwen35": (
        Qwen3_5TextConfig,
        Qwen3_5ForCausalLM,
        {
            "head_dim": 64,
            "linear_num_key_heads": 4,
            "linear_num_value_heads": 8,
            "linear_key_head_dim": 64,
            "linear_value_head_dim": 64,
            "layer_types": _SIX_LINEAR,
        },
    ),
}


class _Arms:
    """One model at one length: a warmed prefix, and the three ways to the first token."""

    def __init__(self, loaded: LoadedModel, engine: Engine, n: int) -> None:
        self.loaded, self.engine, self.n = loaded, engine, n
        self.rng = random.Random(n)
        self.vocab = len(loaded.tokenizer)
        self.prefix = self.ids(n - SUFFIX)
        cache = engine.prefix_cache
        assert cache is not None
        before = cache.store.stats()["memory"].bytes
        engine.warmup(self.prefix)
        self.prefix_bytes = cache.store.stats()["memory"].bytes - before

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(n)]

    def cold(self) -> float:
        ttft, done = _first_event_s(self.engine, self.ids(self.n))
        if done.usage.cached_tokens:
            raise RuntimeError("the cold prompt hit the cache")
        return ttft

    def warm(self) -> float:
        ttft, done = _first_event_s(self.engine, self.prefix + self.ids(SUFFIX))
        if done.usage.cached_tokens != len(self.prefix):
            raise RuntimeError(f"expected the {len(self.prefix)}-token prefix restored, got {done.usage}")
        return ttft

    def no_cache(self) -> float:
        ids = torch.tensor([self.ids(self.n)])
        start = time.perf_counter()
        with torch.inference_mode():
            self.loaded.model(ids, logits_to_keep=1).logits[0, -1].argmax().item()
        return time.perf_counter() - start

    def methods(self) -> dict[str, Callable[[], float]]:
        return {"no_cache": self.no_cache, "cold": self.cold, "warm": self.warm}


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def bench_model(name: str, workdir: Path, lengths: list[int], reps: int) -> dict[str, Any]:
    config_class, model_class, extra = MODELS[name]
    model_dir = build_bench_model(workdir / name, config_class=config_class, model_class=model_class, **extra)
    loaded = load_model(str(model_dir), "auto", "float32", cache_dir=workdir / "cache")
    if not loaded.cacheable:
        raise RuntimeError(f"{name} is served uncached: {loaded.cache_reason}")
    out: dict[str, Any] = {"cache_reason": loaded.cache_reason, "lengths": {}}
    for n in lengths:
        cache = build_prefix_cache(StoreOptions(memory_bytes=4 << 30), BLOCK)
        engine = Engine(loaded, cache, BLOCK)
        try:
            arms = _Arms(loaded, engine, n)
            arms.cold()  # first-use costs (allocator, kernels) out of the figures
            samples: dict[str, list[float]] = {k: [] for k in arms.methods()}
            for rep in range(reps):
                order = list(arms.methods().items())
                order = order[rep % len(order) :] + order[: rep % len(order)]
                for key, method in order:
                    samples[key].append(method())
            layout = engine.state_layout
            out["lengths"][str(n)] = {
                "ttft_s": {k: statistics.median(v) for k, v in samples.items()},
                "samples": samples,
                "warm_over_cold": _ratio(samples["warm"], samples["cold"]),
                "cold_over_no_cache": _ratio(samples["cold"], samples["no_cache"]),
                "bytes_per_cached_token": arms.prefix_bytes / len(arms.prefix),
                "state_every_tokens": layout.every * BLOCK if layout is not None else None,
            }
        finally:
            engine.close()
            cache.store.close()
        print(
            f"{name} {n}: {json.dumps({k: v for k, v in out['lengths'][str(n)].items() if k != 'samples'})}"
        )
    return out


def report(results: dict[str, Any]) -> list[str]:
    full = results["full"]["lengths"]
    lines = [
        "| model | tokens | cold TTFT | warm TTFT | warm / cold | cold / no cache "
        "| bytes per cached token (vs full) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for n, row in res["lengths"].items():
            t = row["ttft_s"]
            per = row["bytes_per_cached_token"]
            lines.append(
                f"| {name} | {n} | {t['cold'] * 1000:.0f} ms | {t['warm'] * 1000:.0f} ms | "
                f"{row['warm_over_cold']:.2f} | {row['cold_over_no_cache']:.2f} | "
                f"{per:,.0f} ({per / full[n]['bytes_per_cached_token']:.2f}x) |"
            )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models = ["full", *[m for m in args.models if m != "full"]]  # the bytes reference is always measured
    with tempfile.TemporaryDirectory(prefix="kvproxy-layer-kinds-") as tmp:
        results = {name: bench_model(name, Path(tmp), args.lengths, args.reps) for name in models}
    lines = report(results)
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "block_size": BLOCK,
                "suffix_tokens": SUFFIX,
                "repetitions": args.reps,
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.platform(),
                "results": results,
                "table": lines,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
