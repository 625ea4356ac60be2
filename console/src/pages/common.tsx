import { useEffect, useState } from 'react';

/** Calls `load` now and every `ms` milliseconds while mounted. */
export function usePoll(load: () => Promise<void>, ms: number) {
  useEffect(() => {
    let alive = true;
    const tick = () => {
      if (alive) load().catch(() => undefined);
    };
    tick();
    const timer = setInterval(tick, ms);
    return () => {
      alive = false;
      clearInterval(timer);
    };
  }, [ms]); // eslint-disable-line react-hooks/exhaustive-deps
}

export function Stat({ label, value, testId }: { label: string; value: string; testId: string }) {
  return (
    <div className="rounded bg-white p-4 shadow">
      <dt className="text-sm text-slate-600">{label}</dt>
      <dd className="text-2xl font-semibold" data-testid={testId}>{value}</dd>
    </div>
  );
}

export function useError(): [string, (e: unknown) => void, () => void] {
  const [error, setError] = useState('');
  return [error, (e) => setError((e as Error).message), () => setError('')];
}

export const fmt = (n: number, digits = 1) => n.toLocaleString('en-US', { maximumFractionDigits: digits });
