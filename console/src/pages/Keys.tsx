import { useEffect, useState, type FormEvent } from 'react';
import { api, type Key, type Page, type Team } from '../api';
import { usePrincipal } from '../App';
import { parseLimit } from '../usage';
import { useError } from './common';

export function Keys() {
  const principal = usePrincipal();
  const admin = principal.role === 'admin';
  const [keys, setKeys] = useState<Key[]>([]);
  const [error, fail, clear] = useError();
  const [created, setCreated] = useState<string | null>(null);
  const [teams, setTeams] = useState<Team[]>([]);
  const load = () => api<Page<Key>>('GET', '/keys?limit=1000').then((p) => setKeys(p.data), fail);
  useEffect(() => {
    load();
    api<Page<Team>>('GET', '/teams?limit=1000').then((p) => setTeams(p.data), () => undefined);
  }, []); // eslint-disable-line react-hooks/exhaustive-deps
  const [team, setTeam] = useState('');
  const [role, setRole] = useState('member');

  const [name, setName] = useState('');
  const [rpm, setRpm] = useState('');
  const [budget, setBudget] = useState('');
  const create = async (event: FormEvent) => {
    event.preventDefault();
    clear();
    const limit = parseLimit(rpm);
    if (limit === 'invalid') return fail(new Error('Requests per minute must be a whole number above 0.'));
    try {
      const made = await api<Key & { secret: string }>('POST', '/keys', {
        name,
        rpm: limit,
        budget: budget.trim() === '' ? null : budget.trim(),
        team_id: team || null,
        role,
      });
      setCreated(made.secret);
      setName('');
      setRpm('');
      setBudget('');
      await load();
    } catch (e) {
      fail(e);
    }
  };
  const revoke = async (key: Key) => {
    if (!window.confirm(`Revoke ${key.name}? Requests with it will be refused.`)) return;
    try {
      await api('DELETE', `/keys/${key.id}`);
      await load();
    } catch (e) {
      fail(e);
    }
  };
  return (
    <section aria-labelledby="keys-title">
      <h1 id="keys-title" className="mb-4 text-xl font-semibold">{admin || principal.role === 'viewer' ? 'API keys' : 'My key'}</h1>
      {error && <p role="alert" className="mb-2 text-red-700">{error}</p>}
      {admin && (
        <form onSubmit={create} aria-label="Create a key" className="mb-4 flex flex-wrap items-end gap-3 rounded bg-white p-4 shadow">
          <label className="flex flex-col text-sm">
            Name
            <input required value={name} onChange={(e) => setName(e.target.value)} className="rounded border px-2 py-1" name="name" />
          </label>
          <label className="flex flex-col text-sm">
            Requests per minute (empty: none)
            <input inputMode="numeric" value={rpm} onChange={(e) => setRpm(e.target.value)} className="rounded border px-2 py-1" name="rpm" />
          </label>
          <label className="flex flex-col text-sm">
            Monthly budget (empty: none)
            <input inputMode="decimal" value={budget} onChange={(e) => setBudget(e.target.value)} className="rounded border px-2 py-1" name="budget" />
          </label>
          <label className="flex flex-col text-sm">
            Team
            <select value={team} onChange={(e) => setTeam(e.target.value)} className="rounded border px-2 py-1" name="team">
              <option value="">none</option>
              {teams.map((t) => <option key={t.id} value={t.id}>{t.name}</option>)}
            </select>
          </label>
          <label className="flex flex-col text-sm">
            Role on the console
            <select value={role} onChange={(e) => setRole(e.target.value)} className="rounded border px-2 py-1" name="role">
              <option>member</option><option>viewer</option><option>admin</option>
            </select>
          </label>
          <button type="submit" className="rounded bg-indigo-600 px-4 py-2 text-white focus:ring-2 focus:ring-indigo-300">Create key</button>
        </form>
      )}
      {created && (
        <div role="status" className="mb-4 rounded border border-amber-400 bg-amber-50 p-3">
          <p>The new key, shown this once: copy it now.</p>
          <code data-testid="new-key" className="break-all">{created}</code>{' '}
          <button type="button" className="underline" onClick={() => setCreated(null)}>Done</button>
        </div>
      )}
      <table className="w-full rounded bg-white text-left shadow">
        <thead>
          <tr>
            {['Name', 'Id', 'Prefix', 'Status', 'Team', 'Role', 'RPM', 'TPM', 'Models', 'Budget', 'Spent', ''].map((h) => (
              <th key={h} scope="col" className="p-2">{h}</th>
            ))}
          </tr>
        </thead>
        <tbody>
          {keys.map((k) => (
            <tr key={k.id} className="border-t" data-testid={`key-${k.name}`}>
              <td className="p-2">{k.name}</td>
              <td className="p-2 font-mono text-xs">{k.id}</td>
              <td className="p-2 font-mono">{k.prefix}…</td>
              <td className="p-2" data-testid="status">{k.status}</td>
              <td className="p-2">{k.team_id ?? '—'}</td>
              <td className="p-2">{k.role}</td>
              <td className="p-2">{k.rpm ?? '—'}</td>
              <td className="p-2">{k.tpm ?? '—'}</td>
              <td className="p-2">{k.models.join(', ') || 'all'}</td>
              <td className="p-2">{k.budget ? `${k.budget}/${k.budget_period}` : '—'}</td>
              <td className="p-2">{k.spend ? `${k.spend.spent} (left ${k.spend.left})` : '—'}</td>
              <td className="p-2">
                {admin && k.status === 'active' && (
                  <button type="button" onClick={() => revoke(k)} className="rounded border border-red-600 px-2 py-1 text-red-700" aria-label={`Revoke ${k.name}`}>
                    Revoke
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
