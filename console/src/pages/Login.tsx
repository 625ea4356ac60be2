import { useEffect, useState, type FormEvent } from 'react';
import { api, type Principal } from '../api';

export function Login({ onLogin }: { onLogin: (p: Principal) => void }) {
  const [credential, setCredential] = useState('');
  const [error, setError] = useState('');
  const [sso, setSso] = useState(false);
  useEffect(() => {
    api<{ oidc: boolean }>('GET', '/session').then((o) => setSso(o.oidc), () => undefined);
  }, []);
  const submit = async (event: FormEvent) => {
    event.preventDefault();
    setError('');
    try {
      onLogin(await api<Principal>('POST', '/session', { credential }));
    } catch (e) {
      setError((e as Error).message);
    }
  };
  return (
    <main className="mx-auto mt-24 max-w-md rounded bg-white p-6 shadow">
      <h1 className="mb-4 text-xl font-semibold">Log in to the mornGPT console</h1>
      {sso && (
        <p className="mb-4">
          <a href="/console/login?next=/console/" className="inline-block rounded bg-slate-800 px-4 py-2 text-white focus:ring-2 focus:ring-indigo-300">
            Log in with single sign-on
          </a>
        </p>
      )}
      <form onSubmit={submit} className="flex flex-col gap-3">
        <label htmlFor="credential" className="text-sm">
          Master key, ops token or your API key
        </label>
        <input
          id="credential"
          name="credential"
          type="password"
          autoComplete="current-password"
          required
          autoFocus
          value={credential}
          onChange={(e) => setCredential(e.target.value)}
          className="rounded border px-3 py-2 focus:outline-none focus:ring-2 focus:ring-indigo-500"
        />
        {error && <p role="alert" className="text-red-700">{error}</p>}
        <button type="submit" className="rounded bg-indigo-600 px-4 py-2 text-white focus:ring-2 focus:ring-indigo-300">
          Log in
        </button>
      </form>
    </main>
  );
}
