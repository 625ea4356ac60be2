import { useRef, useState } from 'react';
import { CartesianGrid, Legend, Line, LineChart, ResponsiveContainer, Tooltip, XAxis, YAxis } from 'recharts';
import { api } from '../api';
import { keep, rates, type Rates, type Snapshot } from '../live';
import { fmt, Stat, usePoll } from './common';

const EVERY_MS = 3000;

export function Overview() {
  const last = useRef<Snapshot | null>(null);
  const [now, setNow] = useState<Snapshot | null>(null);
  const [series, setSeries] = useState<Rates[]>([]);
  usePoll(async () => {
    const snapshot = await api<Snapshot>('GET', '/overview');
    const previous = last.current;
    last.current = snapshot;
    setNow(snapshot);
    const point = previous && rates(previous, snapshot);
    if (point) setSeries((s) => keep(s, point, 100));
  }, EVERY_MS);
  const latest = series[series.length - 1];
  const time = (t: number) => new Date(t * 1000).toLocaleTimeString();
  return (
    <section aria-labelledby="overview-title">
      <h1 id="overview-title" className="mb-4 text-xl font-semibold">Overview (live, every {EVERY_MS / 1000} s)</h1>
      <dl className="mb-6 grid grid-cols-2 gap-3 md:grid-cols-4">
        <Stat label="Requests/s" testId="rps" value={latest ? fmt(latest.requestsPerSecond, 2) : '…'} />
        <Stat label="Error rate" testId="error-rate" value={latest ? `${fmt(latest.errorRate * 100)} %` : '…'} />
        <Stat label="Latency p50 / p95" testId="latency" value={latest ? `${fmt(latest.p50Ms, 0)} / ${fmt(latest.p95Ms, 0)} ms` : '…'} />
        <Stat label="Time to first token p50" testId="ttft" value={latest ? `${fmt(latest.ttftP50Ms, 0)} ms` : '…'} />
        <Stat label="Tokens/s" testId="tps" value={latest ? fmt(latest.tokensPerSecond) : '…'} />
        <Stat label="Spend today" testId="spend-today" value={now?.spend_today ?? '…'} />
        <Stat label="Requests since start" testId="requests-total" value={now ? String(now.requests) : '…'} />
        <Stat label="In flight" testId="inflight" value={now ? String(now.inflight) : '…'} />
      </dl>
      <div className="h-72 rounded bg-white p-2 shadow" role="img" aria-label="Requests per second and p95 latency over time">
        <ResponsiveContainer>
          <LineChart data={series}>
            <CartesianGrid strokeDasharray="3 3" />
            <XAxis dataKey="at" tickFormatter={time} />
            <YAxis yAxisId="rps" />
            <YAxis yAxisId="ms" orientation="right" />
            <Tooltip labelFormatter={(t) => time(Number(t))} />
            <Legend />
            <Line yAxisId="rps" dataKey="requestsPerSecond" name="requests/s" stroke="#4f46e5" dot={false} isAnimationActive={false} />
            <Line yAxisId="ms" dataKey="p95Ms" name="p95 ms" stroke="#dc2626" dot={false} isAnimationActive={false} />
          </LineChart>
        </ResponsiveContainer>
      </div>
    </section>
  );
}
