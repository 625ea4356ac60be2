import { describe, expect, it } from 'vitest';
import { parseLimit, pivot, totals, type UsageRow } from './usage';

const row = (period_start: number, group: string, requests: number, cost = '0'): UsageRow => ({
  period_start, group, requests, prompt_tokens: requests, completion_tokens: 2 * requests, cost,
  errors: 0, p50_ms: 0, p95_ms: 0, ttft_p50_ms: 0,
});

describe('pivot', () => {
  it('puts one field per group on each period, groups by total', () => {
    const { points, groups } = pivot([row(7200, 'a', 1), row(3600, 'b', 5), row(3600, 'a', 2)], 'requests');
    expect(points).toEqual([{ period_start: 3600, a: 2, b: 5 }, { period_start: 7200, a: 1 }]);
    expect(groups).toEqual(['b', 'a']);
  });
  it('reads cost as a number and names the empty group', () => {
    expect(pivot([row(0, '', 1, '0.25'), row(0, '', 1, '0.5')], 'cost').points).toEqual([{ period_start: 0, '-': 0.75 }]);
  });
});

describe('totals', () => {
  it('sums each group over the periods, most requests first', () => {
    expect(totals([row(0, 'a', 1, '1'), row(1, 'b', 3), row(2, 'a', 1, '2')])).toEqual([
      { group: 'b', requests: 3, tokens: 9, cost: 0, errors: 0 },
      { group: 'a', requests: 2, tokens: 6, cost: 3, errors: 0 },
    ]);
  });
});

describe('parseLimit', () => {
  it.each([
    ['', null], [' 60 ', 60], ['0', 'invalid'], ['-1', 'invalid'], ['1.5', 'invalid'], ['abc', 'invalid'],
    ['1000000001', 'invalid'],
  ])('%j → %j', (text, expected) => {
    expect(parseLimit(text)).toBe(expected);
  });
});
