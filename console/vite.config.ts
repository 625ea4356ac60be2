// The console builds into the Python package (proxy/console_dist), served at /console/.
// No @vitejs/plugin-react: esbuild's own JSX transform is all this needs.
import tailwindcss from '@tailwindcss/vite';
import { defineConfig } from 'vitest/config';

export default defineConfig({
  base: '/console/',
  esbuild: { jsx: 'automatic' },
  plugins: [tailwindcss()],
  build: {
    outDir: '../proxy/console_dist',
    emptyOutDir: true,
    target: 'es2020',
    chunkSizeWarningLimit: 1500,
  },
  test: { environment: 'node', include: ['src/**/*.test.ts'] },
});
