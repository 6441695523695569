"""model_runner latency: ``python -m bench.model_runner_bench [--quick]``.

The ``bench-llama-8x512`` model (random Llama-style weights built in code: 8 layers, hidden 512,
8 query / 2 KV heads) and prompts of 512/2048/4096 tokens, each a block-aligned shared prefix
plus a 64-token suffix unique to every repetition. Time to first token (TTFT) of:

- ``no_cache``: plain transformers, a full prefill of the prompt;
- ``recipe``: transformers' prefix-reuse recipe, a prebuilt ``DynamicCache`` of the prefix
  deep-copied per request, then the suffix prefilled;
- ``memory``/``disk``/``redis``: ``Engine`` restoring the prefix from that tier (memory emptied
  before each disk/Redis request; disk reads come from the OS page cache after the first);
- ``miss``: ``Engine`` with a prompt no earlier request shares (lookup, then full prefill).

Plus decode tokens/s of ``Engine`` against ``model.generate`` (greedy, same prompt). Methods are
interleaved (rotated every repetition) and each figure is the median of >= 5 runs with its
min-max spread. Prints a markdown table and writes ``bench/results/model_runner.json``.
Redis: ``REDIS_URL`` (default redis://127.0.0.1:6379/0) under a unique prefix, deleted after.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.generation.streamers import BaseStreamer

from model_runner import host_memory
from model_runner.cache_factory import StoreOptions, build_prefix_cache
from model_runner.engine import Engine
from model_runner.kv import cache_argument
from model_runner.loading import LoadedModel, load_model
from model_runner.records import Finished, GenerationRequest
from model_runner.sampling import SamplingParams
from model_runner.tokenizer_builder import pseudo_word_corpus, train_bpe_tokenizer

BENCH_MODEL = "bench-llama-8x512"
BLOCK = 64
SUFFIX = 64
TARGETS = {"memory": 1.10, "disk": 1.30, "redis": 1.30}  # TTFT vs the recipe
MISS_TARGET = 1.03  # TTFT vs no cache
DECODE_TARGET = 0.95  # decode tok/s vs model.generate
MEMORY_BYTES = 1 << 30
"""What the process reserves, as `kvproxy serve` does for its default memory budget."""
RESULTS = Path(__file__).resolve().parent / "results" / "model_runner.json"


def build_bench_model(
    dest: Path,
    seed: int = 0,
    config_class: type[PretrainedConfig] = LlamaConfig,
    model_class: type[PreTrainedModel] = LlamaForCausalLM,
    **config: object,
) -> Path:
    """The benches' random model (8 layers, hidden 512, 8 query / 2 KV heads, vocab 8192) of
    ``model_class`` with its tokenizer, written to ``dest`` (deterministic for a seed)."""
    tokenizer = train_bpe_tokenizer(pseudo_word_corpus(seed, 3000), 8192)
    model = model_class(
        config_class(
            vocab_size=len(tokenizer),
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=2,
            max_position_embeddings=8192,
            bos_token_id=0,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=0,
            tie_word_embeddings=False,
            **config,
        )
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if "norm" in name:
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 if "lm_head" in name else 0.03))
        # A zero EOS row never wins greedy decoding, so every decode runs its full length.
        model.lm_head.weight[tokenizer.eos_token_id].zero_()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = 0
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)
    return dest


def _first_event_s(engine: Engine, ids: list[int]) -> tuple[float, Finished]:
    """Seconds from the call to the first event (what a client waits), then drain the rest."""
    start = time.perf_counter()
    stream = engine.generate(GenerationRequest(ids, SamplingParams(max_tokens=1, temperature=0.0)))
    next(stream)
    ttft = time.perf_counter() - start
    last = list(stream)[-1]
    if not isinstance(last, Finished):
        raise RuntimeError("stream did not finish")
    return ttft, last


class _Stamps(BaseStreamer):
    """Timestamps of every token ``generate`` emits (the first put is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": samples,
    }


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median of the per-repetition ratios a_i / b_i. The two runs of a repetition are adjacent in
    time, so they share the machine's load: on a busy host this is far steadier than a ratio of
    medians."""
    return statistics.median(x / y for x, y in zip(a["samples"], b["samples"], strict=True))


def redis_url() -> str | None:
    """``REDIS_URL`` (default the local server) when it answers, else ``None`` (Redis arms skipped)."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
            client.ping()
    except redis.RedisError:
        return None
    return url


class _Scenario:
    """One prompt length: the shared prefix, its prebuilt cache (for the recipe) and the engines."""

    def __init__(self, loaded: LoadedModel, n: int, engines: dict[str, Engine], miss: Engine) -> None:
        self.loaded, self.n, self.engines, self.miss_engine = loaded, n, engines, miss
        self.vocab = len(loaded.tokenizer)
        self.rng = random.Random(n)
        self.shared = self.random_ids(n - SUFFIX)
        self.cache_kw = cache_argument(loaded.model)
        with torch.inference_mode():
            self.template = DynamicCache(config=loaded.model.config)
            loaded.model(torch.tensor([self.shared]), logits_to_keep=1, **{self.cache_kw: self.template})
        for engine in engines.values():
            engine.warmup(self.shared)
            cache = engine.prefix_cache
            if cache is not None and not cache.store.drain(60.0):
                raise RuntimeError("the writer did not drain")

    def random_ids(self, n: int) -> list[int]:
        return [self.rng.randrange(3, self.vocab) for _ in range(n)]

    def no_cache(self, ids: list[int]) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            self.loaded.model(torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax().item()
        return time.perf_counter() - start

    def recipe(self, ids: list[int]) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            past = copy.deepcopy(self.template)
            suffix = torch.tensor([ids[len(self.shared) :]])
            self.loaded.model(suffix, logits_to_keep=1, **{self.cache_kw: past}).logits[0, -1].argmax().item()
        return time.perf_counter() - start

    def tier(self, name: str, ids: list[int]) -> float:
        engine = self.engines[name]
        cache = engine.prefix_cache
        if name != "memory" and cache is not None:
            cache.store.memory.clear()  # the prefix must come from the lower tier
        ttft, done = _first_event_s(engine, ids)
        if done.usage.cached_by_tier.get(name, 0) != len(self.shared):
            raise RuntimeError(f"{name}: expected the prefix from {name}, got {done.usage}")
        return ttft

    def miss(self, ids: list[int]) -> float:
        ttft, done = _first_event_s(self.miss_engine, self.random_ids(self.n))
        if done.usage.cached_tokens:
            raise RuntimeError("the miss prompt hit the cache")
        return ttft

    def methods(self) -> dict[str, Callable[[list[int]], float]]:
        out: dict[str, Callable[[list[int]], float]] = {"no_cache": self.no_cache, "recipe": self.recipe}
        out.update({name: functools.partial(self.tier, name) for name in self.engines})
        out["miss"] = self.miss
        return out


def bench_ttft(loaded: LoadedModel, lengths: list[int], reps: int, workdir: Path) -> dict[str, Any]:
    shared_redis, prefix = redis_url(), f"kvpbench:{uuid.uuid4().hex}:"
    tiers: dict[str, StoreOptions] = {
        "memory": StoreOptions(memory_bytes=4 << 30),
        "disk": StoreOptions(memory_bytes=4 << 30, disk_dir=workdir / "blocks", disk_bytes=8 << 30),
    }
    if shared_redis is not None:
        tiers["redis"] = StoreOptions(memory_bytes=4 << 30, redis_url=shared_redis, redis_prefix=prefix)
    engines = {name: Engine(loaded, build_prefix_cache(opts, BLOCK), BLOCK) for name, opts in tiers.items()}
    miss_engine = Engine(loaded, build_prefix_cache(StoreOptions(memory_bytes=4 << 30), BLOCK), BLOCK)
    results: dict[str, Any] = {}
    try:
        for n in lengths:
            scenario = _Scenario(loaded, n, engines, miss_engine)
            methods = scenario.methods()
            samples: dict[str, list[float]] = {name: [] for name in methods}
            names = list(methods)
            for rep in range(reps + 1):  # repetition 0 warms every path up and is dropped
                ids = scenario.shared + scenario.random_ids(SUFFIX)
                order = names[rep % len(names) :] + names[: rep % len(names)]
                for name in order:
                    seconds = methods[name](ids)
                    if rep:
                        samples[name].append(seconds)
            results[str(n)] = {name: _summary(values) for name, values in samples.items()}
            print(f"  {n} tokens done", flush=True)
    finally:
        for engine in [*engines.values(), miss_engine]:
            if engine.prefix_cache is not None:
                engine.prefix_cache.store.clear()
                engine.prefix_cache.store.close()
    return results


def bench_decode(loaded: LoadedModel, new_tokens: int, reps: int) -> dict[str, Any]:
    model = loaded.model
    vocab = len(loaded.tokenizer)
    rng = random.Random(2)
    engine = Engine(loaded, build_prefix_cache(StoreOptions(memory_bytes=1 << 30), BLOCK), BLOCK)
    samples: dict[str, list[float]] = {"generate": [], "engine": []}
    for rep in range(reps + 1):
        ids = [rng.randrange(3, vocab) for _ in range(512)]
        for name in ["generate", "engine"] if rep % 2 else ["engine", "generate"]:
            if name == "generate":
                stamps = _Stamps()
                with torch.inference_mode():
                    model.generate(
                        torch.tensor([ids]),
                        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        streamer=stamps,
                        pad_token_id=0,
                    )
                rate = (len(stamps.times) - 2) / (stamps.times[-1] - stamps.times[1])
            else:
                request = GenerationRequest(ids, SamplingParams(max_tokens=new_tokens, temperature=0.0))
                done = list(engine.generate(request))[-1]
                if not isinstance(done, Finished) or done.usage.completion_tokens != new_tokens:
                    raise RuntimeError(f"engine stopped early: {done}")
                rate = (new_tokens - 1) / done.usage.decode_s
            if rep:
                samples[name].append(rate)
    engine.prefix_cache.store.close()  # type: ignore[union-attr]
    return {name: _summary(values) for name, values in samples.items()}


def _fmt(s: dict[str, float], scale: float = 1000.0) -> str:
    return f"{s['median'] * scale:.1f} ({s['min'] * scale:.1f}-{s['max'] * scale:.1f})"


def report(ttft: dict[str, Any], decode: dict[str, Any]) -> list[str]:
    tiers = [t for t in ("memory", "disk", "redis") if all(t in row for row in ttft.values())]
    head = ["prompt", "no cache", "recipe", *tiers, "miss", *(f"{t}/recipe" for t in tiers), "miss/no cache"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n, row in ttft.items():
        cells = [
            n,
            _fmt(row["no_cache"]),
            _fmt(row["recipe"]),
            *(_fmt(row[t]) for t in tiers),
            _fmt(row["miss"]),
        ]
        for t in tiers:
            ratio = paired_ratio(row[t], row["recipe"])
            cells.append(f"{ratio:.2f} {'ok' if ratio <= TARGETS[t] else 'MISSED'} (<= {TARGETS[t]})")
        ratio = paired_ratio(row["miss"], row["no_cache"])
        cells.append(f"{ratio:.4f} {'ok' if ratio <= MISS_TARGET else 'MISSED'} (<= {MISS_TARGET})")
        lines.append("| " + " | ".join(cells) + " |")
    ratio = paired_ratio(decode["engine"], decode["generate"])
    lines += [
        "",
        "TTFT in ms: median (min-max). Ratios: median of per-repetition (paired) ratios.",
        "",
        "| decode | model.generate tok/s | Engine tok/s | Engine/generate |",
        "|---|---|---|---|",
        f"| 512-token prompt | {_fmt(decode['generate'], 1)} | {_fmt(decode['engine'], 1)} | "
        f"{ratio:.4f} {'ok' if ratio >= DECODE_TARGET else 'MISSED'} (>= {DECODE_TARGET}) |",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 repetitions, 32 decode tokens")
    parser.add_argument("--lengths", type=int, nargs="*", default=[512, 2048, 4096])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    args = parser.parse_args(argv)
    # The engine runs here as it runs in `kvproxy serve`: under the server's host memory settings
    # (model_runner/host_memory.py), which the recipe and no-cache arms share.
    tuning = host_memory.tune_allocator(host_memory.reservation_bytes(MEMORY_BYTES))
    if args.threads:
        torch.set_num_threads(args.threads)
    reps, new_tokens = (5, 32) if args.quick else (9, 128)
    with tempfile.TemporaryDirectory(prefix="kvproxy-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = build_bench_model(workdir / BENCH_MODEL)
        loaded = load_model(str(model_dir), "auto", "auto", cache_dir=workdir / "cache")
        host_memory.settle(tuning.reserve_bytes)
        print(
            f"{BENCH_MODEL} on {loaded.device} ({loaded.dtype}), {torch.get_num_threads()} threads",
            flush=True,
        )
        ttft = bench_ttft(loaded, args.lengths, reps, workdir)
        decode = bench_decode(loaded, new_tokens, reps)
    lines = report(ttft, decode)
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "model": BENCH_MODEL,
                "block_size": BLOCK,
                "suffix_tokens": SUFFIX,
                "quick": args.quick,
                "repetitions": reps,
                "device": str(loaded.device),
                "dtype": str(loaded.dtype),
                "torch": torch.__version__,
                "threads": torch.get_num_threads(),
                "machine": platform.platform(),
                "ttft_s": ttft,
                "decode_tok_s": decode,
                "targets": {
                    "ttft_vs_recipe": TARGETS,
                    "miss_vs_no_cache": MISS_TARGET,
                    "decode": DECODE_TARGET,
                },
                "table": lines,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
