import { createContext, useContext, useEffect, useState } from 'react';
import { BrowserRouter, NavLink, Navigate, Route, Routes } from 'react-router-dom';
import { api, type Principal } from './api';
import { Deployments } from './pages/Deployments';
import { Keys } from './pages/Keys';
import { Login } from './pages/Login';
import { Overview } from './pages/Overview';
import { Teams } from './pages/Teams';
import { Usage } from './pages/Usage';

const Who = createContext<Principal | null>(null);
export const usePrincipal = () => useContext(Who)!;

export function App() {
  const [principal, setPrincipal] = useState<Principal | null | undefined>(undefined);
  useEffect(() => {
    api<Principal>('GET', '/me').then(setPrincipal, () => setPrincipal(null));
  }, []);
  if (principal === undefined) return <p className="p-8">Loading…</p>;
  if (principal === null) return <Login onLogin={setPrincipal} />;
  const staff = principal.role !== 'member';
  const logout = async () => {
    if (principal.source === 'session') {
      window.location.assign('/console/logout'); // the single sign-on session (server side)
      return;
    }
    await api('DELETE', '/session');
    setPrincipal(null);
  };
  const link = ({ isActive }: { isActive: boolean }) =>
    `rounded px-3 py-2 focus:outline-none focus:ring-2 focus:ring-indigo-500 ${isActive ? 'bg-indigo-600 text-white' : 'hover:bg-slate-200'}`;
  return (
    <Who.Provider value={principal}>
      <BrowserRouter basename="/console">
        <header className="flex items-center gap-2 border-b bg-white px-4 py-2">
          <strong className="mr-4">mornGPT console</strong>
          <nav aria-label="Main" className="flex gap-1">
            {staff && <NavLink to="/" end className={link}>Overview</NavLink>}
            {staff && <NavLink to="/deployments" className={link}>Deployments</NavLink>}
            <NavLink to="/keys" className={link}>{staff ? 'Keys' : 'My key'}</NavLink>
            {(staff || principal.team_id) && <NavLink to="/teams" className={link}>{staff ? 'Teams' : 'My team'}</NavLink>}
            <NavLink to="/usage" className={link}>Usage</NavLink>
          </nav>
          <span className="ml-auto text-sm text-slate-600">
            {principal.name} ({principal.role})
          </span>
          <button type="button" onClick={logout} className="rounded border px-3 py-1 focus:ring-2 focus:ring-indigo-500">
            Log out
          </button>
        </header>
        <main className="mx-auto max-w-6xl p-4">
          <Routes>
            <Route path="/" element={staff ? <Overview /> : <Navigate to="/keys" replace />} />
            <Route path="/deployments" element={<Deployments />} />
            <Route path="/keys" element={<Keys />} />
            <Route path="/teams" element={<Teams />} />
            <Route path="/usage" element={<Usage />} />
            <Route path="*" element={<Navigate to="/" replace />} />
          </Routes>
        </main>
      </BrowserRouter>
    </Who.Provider>
  );
}
