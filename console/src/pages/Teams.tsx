import { useEffect, useState, type FormEvent } from 'react';
import { api, type Page, type Team } from '../api';
import { usePrincipal } from '../App';
import { parseLimit } from '../usage';
import { useError } from './common';

export function Teams() {
  const admin = usePrincipal().role === 'admin';
  const [teams, setTeams] = useState<Team[]>([]);
  const [error, fail, clear] = useError();
  const load = () => api<Page<Team>>('GET', '/teams?limit=1000').then((p) => setTeams(p.data), fail);
  useEffect(() => {
    load();
  }, []); // eslint-disable-line react-hooks/exhaustive-deps
  const [name, setName] = useState('');
  const [rpm, setRpm] = useState('');
  const [budget, setBudget] = useState('');
  const create = async (event: FormEvent) => {
    event.preventDefault();
    clear();
    const limit = parseLimit(rpm);
    if (limit === 'invalid') return fail(new Error('Requests per minute must be a whole number above 0.'));
    try {
      await api('POST', '/teams', { name, rpm: limit, budget: budget.trim() === '' ? null : budget.trim() });
      setName('');
      setRpm('');
      setBudget('');
      await load();
    } catch (e) {
      fail(e);
    }
  };
  const remove = async (team: Team) => {
    if (!window.confirm(`Delete team ${team.name}?`)) return;
    try {
      await api('DELETE', `/teams/${team.id}`);
      await load();
    } catch (e) {
      fail(e);
    }
  };
  return (
    <section aria-labelledby="teams-title">
      <h1 id="teams-title" className="mb-4 text-xl font-semibold">Teams</h1>
      {error && <p role="alert" className="mb-2 text-red-700">{error}</p>}
      {admin && (
        <form onSubmit={create} aria-label="Create a team" className="mb-4 flex flex-wrap items-end gap-3 rounded bg-white p-4 shadow">
          <label className="flex flex-col text-sm">
            Name
            <input required value={name} onChange={(e) => setName(e.target.value)} className="rounded border px-2 py-1" name="team-name" />
          </label>
          <label className="flex flex-col text-sm">
            Requests per minute (empty: none)
            <input inputMode="numeric" value={rpm} onChange={(e) => setRpm(e.target.value)} className="rounded border px-2 py-1" name="team-rpm" />
          </label>
          <label className="flex flex-col text-sm">
            Monthly budget (empty: none)
            <input inputMode="decimal" value={budget} onChange={(e) => setBudget(e.target.value)} className="rounded border px-2 py-1" name="team-budget" />
          </label>
          <button type="submit" className="rounded bg-indigo-600 px-4 py-2 text-white focus:ring-2 focus:ring-indigo-300">Create team</button>
        </form>
      )}
      <table className="w-full rounded bg-white text-left shadow">
        <thead>
          <tr>
            {['Name', 'Id', 'RPM', 'TPM', 'Parallel', 'Models', 'Budget', 'Spent', ''].map((h) => (
              <th key={h} scope="col" className="p-2">{h}</th>
            ))}
          </tr>
        </thead>
        <tbody>
          {teams.map((t) => (
            <tr key={t.id} className="border-t">
              <td className="p-2">{t.name}</td>
              <td className="p-2 font-mono text-xs">{t.id}</td>
              <td className="p-2">{t.rpm ?? '—'}</td>
              <td className="p-2">{t.tpm ?? '—'}</td>
              <td className="p-2">{t.max_parallel ?? '—'}</td>
              <td className="p-2">{t.models.join(', ') || 'all'}</td>
              <td className="p-2">{t.budget ? `${t.budget}/${t.budget_period}` : '—'}</td>
              <td className="p-2">{t.spend ? `${t.spend.spent} (left ${t.spend.left})` : '—'}</td>
              <td className="p-2">
                {admin && (
                  <button type="button" onClick={() => remove(t)} className="rounded border border-red-600 px-2 py-1 text-red-700" aria-label={`Delete team ${t.name}`}>
                    Delete
                  </button>
                )}
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </section>
  );
}
