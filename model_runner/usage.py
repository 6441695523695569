"""What a finished request reports: a generation's ``UsageReport``, a warmup's ``WarmupResult``."""

from __future__ import annotations

from model_runner.records import UsageReport, WarmupResult
from model_runner.sequence import Sequence


def usage_report(seq: Sequence, block_size: int, now: float) -> UsageReport:
    """The usage of ``seq`` as of ``now`` (a ``perf_counter`` mark): a phase it never reached
    ends at ``now``. A forked choice reports the prompt lookup of the sequence it was forked from."""
    tl = seq.timeline
    cached = seq.cached
    prompt_side = seq.parent if seq.parent is not None else seq  # who looked the prompt up
    hit = prompt_side.hit
    by_tier: dict[str, int] = {}
    if hit is not None:
        for i, tier in enumerate(hit.tiers):
            tokens = min(block_size, cached - i * block_size)
            if tokens > 0:
                by_tier[tier] = by_tier.get(tier, 0) + tokens
    admitted = tl.admitted if tl.admitted is not None else now
    restored = tl.restored if tl.restored is not None else admitted
    ttft_end = tl.first_token if tl.first_token is not None else now
    queue_s = max(admitted - tl.submitted - tl.lookup_s, 0.0)
    return UsageReport(
        prompt_tokens=len(seq.prompt),
        completion_tokens=len(seq.generated),
        cached_tokens=cached,
        cached_by_tier=by_tier,
        prefilled_tokens=len(seq.prompt) - cached if tl.first_token is not None else 0,
        ttft_s=ttft_end - tl.submitted,
        lookup_s=tl.lookup_s,
        queue_s=queue_s,
        restore_s=restored - admitted,
        prefill_s=max(ttft_end - restored, 0.0),
        prefill_steps=seq.prefill_steps,
        decode_s=now - ttft_end,
        miss_reason=hit.miss_reason if hit is not None else "cache_disabled",
        miss_block=hit.miss_block if hit is not None else None,
        written_blocks=tuple(
            b for b in prompt_side.written_blocks if (b + 1) * block_size <= len(seq.prompt)
        ),
    )


def warmup_report(seq: Sequence) -> WarmupResult:
    """The result of the warmup ``seq``: its blocks stored beyond those the lookup matched."""
    return WarmupResult(
        prompt_tokens=len(seq.prompt),
        cached_tokens=seq.cached,
        prefilled_tokens=max(seq.fed - seq.cached, 0),
        stored_blocks=max(seq.stored_blocks - (len(seq.hit.blocks) if seq.hit else 0), 0),
        miss_reason=seq.hit.miss_reason if seq.hit is not None else "cache_disabled",
        pins=tuple(seq.pin_outcomes),
    )
