"""The numbers the server shows: GET /metrics in Prometheus' text format, and the console progress line."""

from __future__ import annotations

PREFIX = "dsr1_"


def prefix_hit_rate(stats) -> float:
    """cached_prompt_tokens / prompt_tokens (0 before any prompt)."""
    return stats.cached_prompt_tokens / stats.prompt_tokens if stats.prompt_tokens else 0.0


def progress_line(snapshot) -> str:
    """The console line: requests, tokens/s, cache use, prefix-cache hit rate."""
    s = snapshot.stats
    return (f"running {s.running}, waiting {s.waiting} | {snapshot.current_rate():.1f} tokens/s | cache {s.used_blocks}/{s.total_blocks} blocks "
            f"| prefix hits {prefix_hit_rate(s):.0%} of {s.prompt_tokens} prompt tokens")


def render(snapshot, model_name: str) -> str:
    """Prometheus exposition text of an engine_loop.Snapshot, each sample labelled with the served model."""
    s = snapshot.stats
    rows = [
        ("generation_tokens_per_second", "gauge", "generated tokens per second over the last 10 s", snapshot.current_rate()),
        ("prompt_tokens_total", "counter", "prompt tokens of all requests admitted", s.prompt_tokens),
        ("generation_tokens_total", "counter", "tokens generated", s.generated_tokens),
        ("prefix_cache_hit_tokens_total", "counter", "prompt tokens found in the prefix cache", s.cached_prompt_tokens),
        ("prefix_cache_hit_rate", "gauge", "prefix_cache_hit_tokens_total / prompt_tokens_total", prefix_hit_rate(s)),
        ("requests_running", "gauge", "requests being decoded", s.running),
        ("requests_waiting", "gauge", "requests waiting for cache blocks or a batch slot", s.waiting),
        ("requests_finished_total", "counter", "requests finished (stopped, at their length limit or aborted)", s.finished),
        ("preemptions_total", "counter", "requests preempted to free cache blocks", s.preemptions),
        ("cache_blocks_used", "gauge", "KV-cache blocks in use", s.used_blocks),
        ("cache_blocks_total", "gauge", "KV-cache blocks", s.total_blocks),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}", f'{PREFIX}{name}{{model_name="{model_name}"}} {value}']
    return "\n".join(lines) + "\n"
