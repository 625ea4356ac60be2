// Pure logic of the live overview: two snapshots of the proxy's cumulative counters
// (GET /admin/v1/overview) become rates and percentiles over the time between them.

export interface Histogram {
  bounds_ms: number[];
  counts: number[];
}

export interface Snapshot {
  at: number;
  requests: number;
  errors: number;
  prompt_tokens: number;
  completion_tokens: number;
  cost: number;
  inflight: number;
  duration: Histogram;
  ttft: Histogram;
  spend_today: string | null;
}

export interface Rates {
  at: number;
  requestsPerSecond: number;
  errorRate: number; // 0..1 of the requests in the interval
  p50Ms: number;
  p95Ms: number;
  ttftP50Ms: number;
  tokensPerSecond: number;
}

/** The `fraction` quantile of a per-bucket histogram, interpolated within its bucket
 * (the open last bucket is read as ending at twice the last bound). 0 when empty. */
export function percentile(h: Histogram, fraction: number): number {
  const total = h.counts.reduce((a, b) => a + b, 0);
  if (total <= 0) return 0;
  const rank = fraction * total;
  let seen = 0;
  for (let i = 0; i < h.counts.length; i++) {
    const count = h.counts[i];
    if (count > 0 && seen + count >= rank) {
      const low = i > 0 ? h.bounds_ms[i - 1] : 0;
      const last = h.bounds_ms[h.bounds_ms.length - 1] ?? 0;
      const high = i < h.bounds_ms.length ? h.bounds_ms[i] : 2 * last;
      return low + ((high - low) * (rank - seen)) / count;
    }
    seen += count;
  }
  return h.bounds_ms[h.bounds_ms.length - 1] ?? 0;
}

/** Bucket-wise difference `later - earlier` (a restarted worker can make a counter go
 * down: such a bucket counts as 0, never negative). */
export function difference(later: Histogram, earlier: Histogram): Histogram {
  const counts = later.counts.map((c, i) => Math.max(0, c - (earlier.counts[i] ?? 0)));
  return { bounds_ms: later.bounds_ms, counts };
}

/** Rates between two snapshots; null when no time passed between them. */
export function rates(earlier: Snapshot, later: Snapshot): Rates | null {
  const seconds = later.at - earlier.at;
  if (!(seconds > 0)) return null;
  const requests = Math.max(0, later.requests - earlier.requests);
  const errors = Math.max(0, later.errors - earlier.errors);
  const tokens =
    Math.max(0, later.prompt_tokens - earlier.prompt_tokens) +
    Math.max(0, later.completion_tokens - earlier.completion_tokens);
  const duration = difference(later.duration, earlier.duration);
  const ttft = difference(later.ttft, earlier.ttft);
  return {
    at: later.at,
    requestsPerSecond: requests / seconds,
    errorRate: requests > 0 ? errors / requests : 0,
    p50Ms: percentile(duration, 0.5),
    p95Ms: percentile(duration, 0.95),
    ttftP50Ms: percentile(ttft, 0.5),
    tokensPerSecond: tokens / seconds,
  };
}

/** Keeps the last `size` points of a series. */
export function keep<T>(series: T[], point: T, size: number): T[] {
  const next = [...series, point];
  return next.length > size ? next.slice(next.length - size) : next;
}
