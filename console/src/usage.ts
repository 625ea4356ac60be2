// Usage rows (GET /admin/v1/usage) reshaped for charts and tables.

export interface UsageRow {
  period_start: number;
  group: string;
  requests: number;
  prompt_tokens: number;
  completion_tokens: number;
  cost: string;
  errors: number;
  p50_ms: number;
  p95_ms: number;
  ttft_p50_ms: number;
}

export type Metric = 'requests' | 'cost' | 'tokens' | 'errors';

export function value(row: UsageRow, metric: Metric): number {
  if (metric === 'cost') return Number(row.cost);
  if (metric === 'tokens') return row.prompt_tokens + row.completion_tokens;
  return row[metric];
}

/** One point per period with one field per group (what a stacked chart wants), and the
 * groups ordered by their total, largest first. */
export function pivot(rows: UsageRow[], metric: Metric): { points: Record<string, number>[]; groups: string[] } {
  const byPeriod = new Map<number, Record<string, number>>();
  const totals = new Map<string, number>();
  for (const row of rows) {
    const name = row.group || '-';
    const point = byPeriod.get(row.period_start) ?? { period_start: row.period_start };
    point[name] = (point[name] ?? 0) + value(row, metric);
    byPeriod.set(row.period_start, point);
    totals.set(name, (totals.get(name) ?? 0) + value(row, metric));
  }
  const points = [...byPeriod.values()].sort((a, b) => a.period_start - b.period_start);
  const groups = [...totals.entries()].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0])).map(([g]) => g);
  return { points, groups };
}

/** Totals per group over all periods, largest request count first. */
export function totals(rows: UsageRow[]): { group: string; requests: number; tokens: number; cost: number; errors: number }[] {
  const found = new Map<string, { group: string; requests: number; tokens: number; cost: number; errors: number }>();
  for (const row of rows) {
    const name = row.group || '-';
    const t = found.get(name) ?? { group: name, requests: 0, tokens: 0, cost: 0, errors: 0 };
    t.requests += row.requests;
    t.tokens += row.prompt_tokens + row.completion_tokens;
    t.cost += Number(row.cost);
    t.errors += row.errors;
    found.set(name, t);
  }
  return [...found.values()].sort((a, b) => b.requests - a.requests || a.group.localeCompare(b.group));
}

/** Limits typed in a form: "" means none; anything else must be a whole number > 0. */
export function parseLimit(text: string): number | null | 'invalid' {
  const t = text.trim();
  if (t === '') return null;
  if (!/^\d+$/.test(t)) return 'invalid';
  const n = Number(t);
  return n > 0 && n <= 1_000_000_000 ? n : 'invalid';
}
