// The admin API client: same origin, the session cookie, OpenAI-shaped errors.

export class ApiError extends Error {
  constructor(public status: number, message: string) {
    super(message);
  }
}

export async function api<T>(method: string, path: string, body?: unknown): Promise<T> {
  const response = await fetch(`/admin/v1${path}`, {
    method,
    credentials: 'same-origin',
    headers: body === undefined ? {} : { 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (response.status === 204) return undefined as T;
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, data?.error?.message ?? `HTTP ${response.status}`);
  }
  return data as T;
}

export interface Principal {
  role: 'admin' | 'viewer' | 'member';
  source: string;
  name: string;
  key_id: string | null;
  team_id: string | null;
}

export interface Team {
  id: string;
  name: string;
  rpm: number | null;
  tpm: number | null;
  max_parallel: number | null;
  models: string[];
  budget: string | null;
  budget_period: string;
  spend: { spent: string; left: string; period_start: number } | null;
}

export interface Key {
  id: string;
  name: string;
  prefix: string;
  status: string;
  rpm: number | null;
  tpm: number | null;
  max_parallel: number | null;
  models: string[];
  budget: string | null;
  budget_period: string;
  spend: { spent: string; left: string; period_start: number } | null;
  team_id: string | null;
  role: string;
}

export interface Page<T> {
  data: T[];
  has_more: boolean;
  next_offset: number | null;
}
