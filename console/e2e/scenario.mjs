// The console's end-to-end scenario, one definition for every browser, driven by
// puppeteer-core (which never downloads a browser): Chromium over CDP, Firefox over
// WebDriver BiDi. tests/test_console_e2e.py starts the proxy and runs this script:
//   MASTER_KEY=... node e2e/scenario.mjs <chrome|firefox> <executable> <console url> <screenshot.png>
// Requests through the proxy are the test's (the official openai SDK): this script asks
// for one by writing {"chat": key} on stdout and reads "ok" or "refused" back on stdin.
// It also writes {"secret": key} for every key it creates and {"load": [dcl, load]}.
import { createInterface } from 'node:readline';
import puppeteer from 'puppeteer-core';

const [browserName, executablePath, consoleUrl, screenshot] = process.argv.slice(2);
const master = process.env.MASTER_KEY; // not in argv, where ps would show it
const WAIT = 20000;
const answers = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
const say = (message) => process.stdout.write(JSON.stringify(message) + '\n');

async function chat(key) {
  say({ chat: key });
  return (await answers.next()).value;
}

const browser = await puppeteer.launch({
  browser: browserName,
  executablePath,
  headless: true,
  // puppeteer gives each launch a fresh temporary profile and removes it on close.
  args: browserName === 'chrome' ? ['--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage'] : [],
  defaultViewport: { width: 1280, height: 900 },
});
const page = await browser.newPage();
page.setDefaultTimeout(WAIT);
page.on('dialog', (dialog) => dialog.accept()); // the revoke confirmation

// Wait until `check` (run in the page) returns something truthy, saying what timed out.
async function until(what, check, ...args) {
  try {
    return await page.waitForFunction(check, { timeout: WAIT, polling: 100 }, ...args);
  } catch (error) {
    throw new Error(`timed out waiting for ${what}: ${error.message}`);
  }
}
// Retry `attempt` (run here) until it returns something truthy, as the page may lag.
async function poll(what, attempt) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const found = await attempt().catch(() => null);
    if (found) return found;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}
const TOTAL = '[data-testid="requests-total"]';
const click = async (selector) => (await page.waitForSelector(selector)).click();
const link = (name) => `a::-p-text(${name})`;
const button = (name) => `button::-p-text(${name})`;

async function login(credential) {
  await page.waitForSelector('#credential');
  await page.type('#credential', credential);
  await page.keyboard.press('Enter'); // keyboard only: the form submits on Enter
}

async function scenario() {
  await page.goto(consoleUrl);
  await page.waitForSelector('#credential');
  say({
    load: await page.evaluate(() => {
      const t = performance.getEntriesByType('navigation')[0];
      return [t.domContentLoadedEventEnd, t.loadEventEnd];
    }),
  });
  await login(master);
  await until('the overview', (sel) => ![undefined, '…'].includes(document.querySelector(sel)?.textContent), TOTAL);
  await click(link('Keys'));

  async function create(name, rpm) {
    await page.waitForSelector('input[name="name"]');
    await page.type('input[name="name"]', name);
    await page.type('input[name="rpm"]', rpm);
    await click(button('Create key'));
    await page.waitForSelector(`[data-testid="key-${name}"]`);
    const key = await page.$eval('[data-testid="new-key"]', (e) => e.textContent);
    say({ secret: key });
    if (!key.startsWith('sk-morn-')) throw new Error(`not a key: ${key.slice(0, 8)}…`);
    return key;
  }
  const other = await create('other-key', '');
  const key = await create('e2e-key', '600');
  if (key === other) throw new Error('two keys are the same');
  const keyId = await page.$eval('[data-testid="key-e2e-key"] td:nth-child(2)', (e) => e.textContent);

  if ((await chat(key)) !== 'ok') throw new Error('the new key was refused');

  await click(link('Overview'));
  await until('the request in the overview', (sel) => Number(document.querySelector(sel)?.textContent) >= 1, TOTAL);

  await poll('the request in the usage table', async () => {
    await click(link('Usage'));
    await page.select('select[name="group_by"]', 'key');
    const cell = await page.$(`[data-testid="usage-${keyId}"] td:nth-child(2)`);
    return cell && (await cell.evaluate((e) => e.textContent)) === '1';
  });

  // The key's holder logs in with it: a member's own view, their key and usage only.
  await click(button('Log out'));
  await login(key);
  await click(link('My key'));
  await page.waitForSelector('tbody tr');
  const rows = await page.$$eval('tbody tr', (all) => all.map((r) => r.dataset.testid));
  if (JSON.stringify(rows) !== '["key-e2e-key"]') throw new Error(`the member sees rows ${rows}`);
  if (await page.$(link('Overview'))) throw new Error('the member sees the overview');
  if (await page.$(button('Create key'))) throw new Error('the member can create keys');
  await click(button('Log out'));
  await login(master);

  await click(link('Keys'));
  await click('button[aria-label="Revoke e2e-key"]');
  await until(
    'the key to show as revoked',
    () => document.querySelector('[data-testid="key-e2e-key"] [data-testid="status"]')?.textContent === 'revoked',
  );
  // The proxy's key cache may serve the key a moment longer: ask until it is refused.
  await poll('the revoked key to be refused', async () => (await chat(key)) === 'refused');
}

try {
  await scenario();
} catch (error) {
  await page.screenshot({ path: screenshot }).catch(() => {});
  console.error(`${error.stack}\nscreenshot of the failure: ${screenshot}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
process.exit(); // stdin stays open while the test waits: leave without waiting for it
