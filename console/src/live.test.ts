import { describe, expect, it } from 'vitest';
import { difference, keep, percentile, rates, type Snapshot } from './live';

const bounds = [10, 100, 1000];
const snap = (at: number, requests: number, errors: number, counts: number[], tokens = 0): Snapshot => ({
  at, requests, errors, prompt_tokens: tokens, completion_tokens: tokens, cost: 0, inflight: 0,
  duration: { bounds_ms: bounds, counts }, ttft: { bounds_ms: bounds, counts }, spend_today: '0',
});

describe('percentile', () => {
  it.each([
    [[0, 0, 0, 0], 0.5, 0],
    [[4, 0, 0, 0], 0.5, 5],
    [[0, 2, 0, 0], 0.5, 55],
    [[0, 0, 0, 2], 1, 2000],
    [[1, 1, 1, 1], 0.95, 1000 + 1000 * 0.8],
  ])('%j at %f is %f', (counts, fraction, expected) => {
    expect(percentile({ bounds_ms: bounds, counts }, fraction)).toBeCloseTo(expected);
  });
});

describe('rates', () => {
  it('are the differences over the seconds between the snapshots', () => {
    const r = rates(snap(100, 10, 1, [5, 5, 0, 0], 50), snap(102, 30, 3, [5, 25, 0, 0], 150))!;
    expect(r.requestsPerSecond).toBe(10);
    expect(r.errorRate).toBeCloseTo(0.1);
    expect(r.tokensPerSecond).toBe(100);
    expect(r.p50Ms).toBeCloseTo(55);
    expect(r.p95Ms).toBeCloseTo(95.5);
  });
  it('are null when no time passed', () => {
    expect(rates(snap(5, 1, 0, [1, 0, 0, 0]), snap(5, 2, 0, [2, 0, 0, 0]))).toBeNull();
  });
  it('never go negative when a worker restarted', () => {
    const r = rates(snap(1, 50, 5, [9, 9, 9, 9]), snap(2, 10, 0, [1, 1, 1, 1]))!;
    expect(r.requestsPerSecond).toBe(0);
    expect(r.errorRate).toBe(0);
    expect(difference({ bounds_ms: bounds, counts: [1] }, { bounds_ms: bounds, counts: [3] }).counts).toEqual([0]);
  });
});

describe('keep', () => {
  it('keeps the last points only', () => {
    expect(keep([1, 2, 3], 4, 3)).toEqual([2, 3, 4]);
    expect(keep([], 1, 3)).toEqual([1]);
  });
});
