"""Per-token cost of constrained decoding on this CPU: ``python -m bench.grammar_bench``.

For one small object schema and two byte-level BPE tokenizers (the tests' 384-token one and a
32,000-token one trained on generated text), measures in one run:

- llguidance through ``model_runner.grammar`` (what the product uses): ``mask_logits`` (mask into
  a preallocated bitmask, then a 0/-inf bias added in place) and ``accept``, per token; and the
  library alone (mask computation and ``consume_token``, no logits work) as its floor;
- xgrammar, if installed (``fill_next_token_bitmask``, ``apply_token_bitmask_inplace`` on the CPU,
  ``accept_token``), per token, with whitespace fixed the same way (``any_whitespace=False``);
- the baseline: one plain unmasked sampling step, ``torch.argmax`` on ``[vocab]`` logits;
- compile time per schema (cache missed on purpose), matcher creation, and tokenizer wrapping.

Tokens come from greedy sampling of seeded random logits under each library's own mask, a fresh
matcher whenever the object is complete, so both see the same kind of JSON. Figures are medians
over all tokens (p90 alongside); ratios are against the argmax baseline. torch runs one thread
(this machine is small and shared). Writes the report to ``docs/bench/grammar.md``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from model_runner.grammar import GrammarCompiler, json_schema_grammar
from model_runner.tokenizer_builder import pseudo_word_corpus, train_bpe_tokenizer
from tests.support.tiny_models import tiny_corpus

REPORT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "grammar.md"
COMMAND = "python -m bench.grammar_bench"
BIG_VOCAB = 32_000
FALLBACK_VOCAB = 8_000
TRAIN_BUDGET_S = 60.0
COMPILE_REPS = 5

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "owner": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 8}, "vip": {"type": "boolean"}},
            "required": ["city", "vip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "kind", "age", "tags", "owner"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class Vocab:
    label: str
    tokenizer: PreTrainedTokenizerBase
    train_s: float

    @property
    def size(self) -> int:
        return len(self.tokenizer)


@dataclass(frozen=True)
class PerToken:
    """Per-token timings in microseconds, one list per phase (same length)."""

    phases: dict[str, list[float]]

    def median(self, phase: str) -> float:
        return statistics.median(self.phases[phase])

    def p90(self, phase: str) -> float:
        values = sorted(self.phases[phase])
        return values[int(0.9 * (len(values) - 1))]

    @property
    def tokens(self) -> int:
        return len(next(iter(self.phases.values())))


@dataclass(frozen=True)
class Arm:
    """One library on one vocabulary."""

    library: str
    per_token: PerToken
    total_phase: str
    compile_ms: float
    matcher_us: float
    setup_ms: float
    """Wrapping the tokenizer (once per served model)."""


def micros(start: int) -> float:
    return (time.perf_counter_ns() - start) / 1_000.0


def train_big_vocab() -> Vocab:
    """A 32,000-token tokenizer, or 8,000 when training would take over a minute here."""
    for size, lines, words in ((BIG_VOCAB, 30_000, 60_000), (FALLBACK_VOCAB, 8_000, 20_000)):
        start = time.perf_counter()
        tok = train_bpe_tokenizer(pseudo_word_corpus(0, lines, words), size)
        took = time.perf_counter() - start
        if took <= TRAIN_BUDGET_S or size == FALLBACK_VOCAB:
            return Vocab(f"{len(tok):,}-token BPE", tok, took)
    raise AssertionError("unreachable")


def logits_source(vocab: int, seed: int) -> Callable[[], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return lambda: torch.randn(vocab, generator=gen) * 4.0


def baseline_us(vocab: int, reps: int) -> PerToken:
    """A plain unmasked greedy step: ``torch.argmax`` over ``[vocab]`` logits."""
    fresh = logits_source(vocab, 7)
    times = []
    for _ in range(reps):
        logits = fresh()
        start = time.perf_counter_ns()
        int(torch.argmax(logits))
        times.append(micros(start))
    return PerToken({"argmax": times})


def bench_llguidance(vocab: Vocab, tokens: int) -> Arm:
    eos = vocab.tokenizer.eos_token_id
    start = time.perf_counter_ns()
    compiler = GrammarCompiler(vocab.tokenizer, vocab.size, [eos])
    setup_ms = micros(start) / 1_000
    compile_ms = []
    for i in range(COMPILE_REPS):  # a distinct title per rep: each compile misses the cache
        start = time.perf_counter_ns()
        compiler.compile(json_schema_grammar({**SCHEMA, "title": f"rep {i}"}))
        compile_ms.append(micros(start) / 1_000)
    compiled = compiler.compile(json_schema_grammar(SCHEMA))
    fresh = logits_source(vocab.size, 0)
    phases: dict[str, list[float]] = {"mask": [], "accept": [], "total": []}
    matcher_us = []
    while len(phases["total"]) < tokens:
        start = time.perf_counter_ns()
        matcher = compiled.matcher()
        matcher_us.append(micros(start))
        while not matcher.done and len(phases["total"]) < tokens:
            logits = fresh()
            start = time.perf_counter_ns()
            matcher.mask_logits(logits)
            mask = micros(start)
            token = int(torch.argmax(logits))
            start = time.perf_counter_ns()
            matcher.accept(token)
            accept = micros(start)
            phases["mask"].append(mask)
            phases["accept"].append(accept)
            phases["total"].append(mask + accept)
    return Arm(
        "llguidance",
        PerToken(phases),
        "total",
        statistics.median(compile_ms),
        statistics.median(matcher_us),
        setup_ms,
    )


def bench_llguidance_raw(vocab: Vocab, tokens: int) -> Arm:
    """llguidance alone (the floor under ``model_runner.grammar``): its mask computed into a
    bitmask and ``consume_token``; the token is picked from the unpacked mask outside the timing."""
    eos = vocab.tokenizer.eos_token_id
    start = time.perf_counter_ns()
    lltok = llguidance.hf.from_tokenizer(vocab.tokenizer, n_vocab=vocab.size, eos_token=[eos])
    setup_ms = micros(start) / 1_000
    source = json_schema_grammar(SCHEMA).source
    compile_ms = []
    for i in range(COMPILE_REPS):
        source_i = json_schema_grammar({**SCHEMA, "title": f"rep {i}"}).source
        start = time.perf_counter_ns()
        llguidance.LLMatcher(lltok, source_i, log_level=0)
        compile_ms.append(micros(start) / 1_000)
    template = llguidance.LLMatcher(lltok, source, log_level=0)
    bitmask = torch.zeros((vocab.size + 31) // 32, dtype=torch.int32)
    fresh = logits_source(vocab.size, 0)
    phases: dict[str, list[float]] = {"compute": [], "consume": [], "total": []}
    matcher_us = []
    while len(phases["total"]) < tokens:
        start = time.perf_counter_ns()
        matcher = template.deep_copy()
        matcher_us.append(micros(start))
        while not matcher.is_stopped() and len(phases["total"]) < tokens:
            logits = fresh()
            start = time.perf_counter_ns()
            matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
            compute = micros(start)
            bits = np.unpackbits(bitmask.numpy().view(np.uint8), count=vocab.size, bitorder="little")
            logits[torch.from_numpy(bits == 0)] = float("-inf")
            token = int(torch.argmax(logits))
            start = time.perf_counter_ns()
            if not matcher.consume_token(token):
                raise RuntimeError(f"llguidance refused token {token} it allowed")
            consume = micros(start)
            phases["compute"].append(compute)
            phases["consume"].append(consume)
            phases["total"].append(compute + consume)
    return Arm(
        "llguidance raw (no logits work)",
        PerToken(phases),
        "total",
        statistics.median(compile_ms),
        statistics.median(matcher_us),
        setup_ms,
    )


def bench_xgrammar(xgr: ModuleType, vocab: Vocab, tokens: int) -> Arm:
    eos = vocab.tokenizer.eos_token_id
    start = time.perf_counter_ns()
    info = xgr.TokenizerInfo.from_huggingface(vocab.tokenizer, vocab_size=vocab.size, stop_token_ids=[eos])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    setup_ms = micros(start) / 1_000

    def compile_schema(schema: dict[str, Any]) -> Any:
        return compiler.compile_json_schema(schema, any_whitespace=False, separators=(", ", ": "))

    compile_ms = []
    for i in range(COMPILE_REPS):
        start = time.perf_counter_ns()
        compile_schema({**SCHEMA, "title": f"rep {i}"})
        compile_ms.append(micros(start) / 1_000)
    compiled = compile_schema(SCHEMA)
    bitmask = xgr.allocate_token_bitmask(1, vocab.size)
    fresh = logits_source(vocab.size, 0)
    phases: dict[str, list[float]] = {"fill": [], "apply": [], "accept": [], "total": []}
    matcher_us = []
    while len(phases["total"]) < tokens:
        start = time.perf_counter_ns()
        matcher = xgr.GrammarMatcher(compiled, terminate_without_stop_token=True)
        matcher_us.append(micros(start))
        while not matcher.is_terminated() and len(phases["total"]) < tokens:
            logits = fresh()
            start = time.perf_counter_ns()
            matcher.fill_next_token_bitmask(bitmask)
            fill = micros(start)
            start = time.perf_counter_ns()
            xgr.apply_token_bitmask_inplace(logits, bitmask)
            apply = micros(start)
            token = int(torch.argmax(logits))
            start = time.perf_counter_ns()
            if not matcher.accept_token(token):
                raise RuntimeError(f"xgrammar refused token {token} it allowed")
            accept = micros(start)
            for phase, value in (("fill", fill), ("apply", apply), ("accept", accept)):
                phases[phase].append(value)
            phases["total"].append(fill + apply + accept)
    return Arm(
        "xgrammar",
        PerToken(phases),
        "total",
        statistics.median(compile_ms),
        statistics.median(matcher_us),
        setup_ms,
    )


def import_xgrammar() -> ModuleType | None:
    try:
        return importlib.import_module("xgrammar")
    except ImportError:
        return None


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def phase_breakdown(arm: Arm) -> str:
    return ", ".join(
        f"{p} {arm.per_token.median(p):.1f}" for p in arm.per_token.phases if p != arm.total_phase
    )


def render(vocabs: list[Vocab], results: dict[str, tuple[PerToken, list[Arm]]], xgr_note: str) -> str:
    lines = [
        "# Constrained decoding: per-token overhead (CPU)",
        "",
        f"Command: `{COMMAND}`  ",
        f"Date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}  ",
        f"Machine: {cpu_name()}, nproc {os.cpu_count()}, torch threads {torch.get_num_threads()} "
        f"(shared machine)  ",
        f"Versions: llguidance {version('llguidance')}, xgrammar {version('xgrammar')}, "
        f"torch {torch.__version__}  ",
        "Tokenizers trained in this run: "
        + ", ".join(f"{v.label} ({v.train_s:.1f} s)" for v in vocabs)
        + "  ",
        "Schema: an object of 5 required properties (bounded string, enum, bounded integer, "
        "array of enums with maxItems, nested object of 2), fixed `tojson` layout.",
        "",
        "Per token = the grammar work around one sampling step (mask + apply + accept), medians over"
        " all tokens; baseline = one unmasked `torch.argmax` over `[vocab]` logits; ratio = per token"
        " / baseline.",
        "",
        "| vocab | library | tokens | per token µs (median) | p90 µs | breakdown µs | baseline µs "
        "| ratio | compile ms | matcher µs | tokenizer setup ms |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for vocab in vocabs:
        base, arms = results[vocab.label]
        base_us = base.median("argmax")
        for arm in arms:
            pt = arm.per_token
            total = pt.median(arm.total_phase)
            lines.append(
                f"| {vocab.label} | {arm.library} | {pt.tokens} | {total:.1f} | {pt.p90(arm.total_phase):.1f}"
                f" | {phase_breakdown(arm)} | {base_us:.1f} | {total / base_us:.1f}x | {arm.compile_ms:.1f}"
                f" | {arm.matcher_us:.1f} | {arm.setup_ms:.0f} |"
            )
    lines += [
        "",
        "Notes:",
        "- llguidance `mask` is `TokenMatcher.mask_logits`: llguidance's mask computed into a"
        " preallocated int32 bitmask, turned into a 0/-inf bias by a byte lookup table and added"
        " to the logits in place.",
        "- llguidance raw = the library alone (mask into a bitmask + `consume_token`, no logits"
        " work): the floor under the product row; raw compile = `LLMatcher` construction, raw"
        " matcher = `deep_copy` of a template (what `CompiledGrammar.matcher()` does).",
        "- xgrammar `apply` is `apply_token_bitmask_inplace` with its CPU kernel; compile with"
        " `cache_enabled=False`, `max_threads=1`.",
        "- compile = schema to a compiled grammar for this tokenizer (cache missed on purpose),"
        " median of 5; matcher = a fresh matcher per request/choice; tokenizer setup = once per model.",
        f"- {xgr_note}",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000, help="timed tokens per library and vocabulary")
    parser.add_argument("--out", type=Path, default=REPORT)
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    tiny_start = time.perf_counter()
    tiny = train_bpe_tokenizer(tiny_corpus(), 384)
    vocabs = [
        Vocab(f"{len(tiny)}-token BPE (tests)", tiny, time.perf_counter() - tiny_start),
        train_big_vocab(),
    ]
    xgr = import_xgrammar()
    xgr_note = (
        "xgrammar is not installed: llguidance only."
        if xgr is None
        else "xgrammar measured in the same run, on the same tokenizers and schema."
    )
    results: dict[str, tuple[PerToken, list[Arm]]] = {}
    for vocab in vocabs:
        arms = [bench_llguidance(vocab, args.tokens), bench_llguidance_raw(vocab, args.tokens)]
        if xgr is not None:
            arms.append(bench_xgrammar(xgr, vocab, args.tokens))
        results[vocab.label] = (baseline_us(vocab.size, args.tokens), arms)
    report = render(vocabs, results, xgr_note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    print(f"({time.perf_counter() - start:.0f} s; written to {args.out})")


if __name__ == "__main__":
    main()
