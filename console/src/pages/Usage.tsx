import { useEffect, useState } from 'react';
import { Bar, BarChart, CartesianGrid, Legend, ResponsiveContainer, Tooltip, XAxis, YAxis } from 'recharts';
import { api, type Page } from '../api';
import { usePrincipal } from '../App';
import { pivot, totals, type Metric, type UsageRow } from '../usage';
import { fmt, useError } from './common';

const COLOURS = ['#4f46e5', '#16a34a', '#dc2626', '#d97706', '#0891b2', '#7c3aed', '#db2777', '#65a30d'];
const SPANS: Record<string, number> = { '24 hours': 86400, '7 days': 7 * 86400, '30 days': 30 * 86400 };

export function Usage() {
  const member = usePrincipal().role === 'member';
  const [groupBy, setGroupBy] = useState(member ? 'model' : 'key');
  const [granularity, setGranularity] = useState('hour');
  const [span, setSpan] = useState('24 hours');
  const [metric, setMetric] = useState<Metric>('requests');
  const [rows, setRows] = useState<UsageRow[]>([]);
  const [error, fail, clear] = useError();
  useEffect(() => {
    const end = Date.now() / 1000;
    const query = new URLSearchParams({ group_by: groupBy, granularity, start: String(end - SPANS[span]), end: String(end), limit: '1000' });
    clear();
    api<Page<UsageRow>>('GET', `/usage?${query}`).then((p) => setRows(p.data), fail);
  }, [groupBy, granularity, span]); // eslint-disable-line react-hooks/exhaustive-deps
  const { points, groups } = pivot(rows, metric);
  const label = (t: number) => new Date(t * 1000).toLocaleString([], granularity === 'day' ? { dateStyle: 'short' } : { timeStyle: 'short' });
  const select = 'rounded border px-2 py-1';
  return (
    <section aria-labelledby="usage-title">
      <h1 id="usage-title" className="mb-4 text-xl font-semibold">Usage and spend</h1>
      <form aria-label="Filters" className="mb-4 flex flex-wrap gap-3" onSubmit={(e) => e.preventDefault()}>
        <label className="flex flex-col text-sm">Group by
          <select className={select} value={groupBy} onChange={(e) => setGroupBy(e.target.value)} name="group_by">
            {['key', 'team', 'model', 'deployment', 'outcome'].map((g) => <option key={g}>{g}</option>)}
          </select>
        </label>
        <label className="flex flex-col text-sm">Per
          <select className={select} value={granularity} onChange={(e) => setGranularity(e.target.value)} name="granularity">
            <option>hour</option><option>day</option>
          </select>
        </label>
        <label className="flex flex-col text-sm">Over the last
          <select className={select} value={span} onChange={(e) => setSpan(e.target.value)} name="span">
            {Object.keys(SPANS).map((s) => <option key={s}>{s}</option>)}
          </select>
        </label>
        <label className="flex flex-col text-sm">Show
          <select className={select} value={metric} onChange={(e) => setMetric(e.target.value as Metric)} name="metric">
            {['requests', 'tokens', 'cost', 'errors'].map((m) => <option key={m}>{m}</option>)}
          </select>
        </label>
      </form>
      {error && <p role="alert" className="text-red-700">{error}</p>}
      <div className="mb-4 h-72 rounded bg-white p-2 shadow" role="img" aria-label={`${metric} per ${granularity} by ${groupBy}`}>
        <ResponsiveContainer>
          <BarChart data={points}>
            <CartesianGrid strokeDasharray="3 3" />
            <XAxis dataKey="period_start" tickFormatter={label} />
            <YAxis />
            <Tooltip labelFormatter={(t) => label(Number(t))} />
            <Legend />
            {groups.slice(0, 8).map((g, i) => (
              <Bar key={g} dataKey={g} stackId="a" fill={COLOURS[i % COLOURS.length]} isAnimationActive={false} />
            ))}
          </BarChart>
        </ResponsiveContainer>
      </div>
      <table className="w-full rounded bg-white text-left shadow" aria-label="Totals">
        <thead>
          <tr>{[groupBy, 'Requests', 'Tokens', 'Cost', 'Errors'].map((h) => <th key={h} scope="col" className="p-2">{h}</th>)}</tr>
        </thead>
        <tbody>
          {totals(rows).map((t) => (
            <tr key={t.group} className="border-t" data-testid={`usage-${t.group}`}>
              <td className="p-2 font-mono text-sm">{t.group}</td>
              <td className="p-2" data-testid="requests">{t.requests}</td>
              <td className="p-2">{t.tokens}</td>
              <td className="p-2">{fmt(t.cost, 6)}</td>
              <td className="p-2">{t.errors}</td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
