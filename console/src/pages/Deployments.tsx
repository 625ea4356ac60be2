import { useState } from 'react';
import { api } from '../api';
import { usePoll } from './common';

interface Deployment {
  name: string;
  healthy: boolean;
  inflight: number;
  latency_ms: number;
  cooldown_remaining: number;
  consecutive_failures: number;
  base_url?: string;
}
interface Model {
  name: string;
  deployments: Deployment[];
}

export function Deployments() {
  const [models, setModels] = useState<Model[]>([]);
  usePoll(async () => setModels((await api<{ models: Model[] }>('GET', '/deployments')).models), 3000);
  return (
    <section aria-labelledby="deployments-title">
      <h1 id="deployments-title" className="mb-4 text-xl font-semibold">Deployments</h1>
      <table className="w-full rounded bg-white text-left shadow">
        <thead>
          <tr>
            {['Model', 'Deployment', 'Health', 'In flight', 'Latency (ms)', 'Cooldown (s)', 'Failures'].map((h) => (
              <th key={h} scope="col" className="p-2">{h}</th>
            ))}
          </tr>
        </thead>
        <tbody>
          {models.flatMap((m) =>
            m.deployments.map((d) => (
              <tr key={`${m.name}/${d.name}`} className="border-t">
                <td className="p-2">{m.name}</td>
                <td className="p-2" title={d.base_url}>{d.name}</td>
                <td className={`p-2 ${d.healthy ? 'text-green-700' : 'text-red-700'}`}>{d.healthy ? 'healthy' : 'ejected'}</td>
                <td className="p-2">{d.inflight}</td>
                <td className="p-2">{d.latency_ms}</td>
                <td className="p-2">{d.cooldown_remaining}</td>
                <td className="p-2">{d.consecutive_failures}</td>
              </tr>
            )),
          )}
        </tbody>
      </table>
    </section>
  );
}
