// Drives Debian's Chromium (headless, through playwright-core) against a `palisade ui` page
// of the seed scenario, for testbed/tests/ui_privileged.rs, which starts the testbed, the
// probes and the page, and checks what this prints.
//
// usage: node ui_check.mjs URL [SCREENSHOT.png]
// Prints one JSON object per line: first {"chromium_pid": N} (so the caller can kill it if
// this script dies), then {"result": {...}} with what the page showed. Exits non-zero with
// the reason on stderr when the page does not show what it must.
import { chromium } from 'playwright-core';

const [url, screenshot] = process.argv.slice(2);
if (!url) {
  console.error('usage: node ui_check.mjs URL [SCREENSHOT.png]');
  process.exit(2);
}
const executablePath = process.env.PALISADE_CHROMIUM || '/usr/bin/chromium';
const STEP_MS = 15000;

function edge(src, dst, verdict) {
  return `g.edge[data-src="${src}"][data-dst="${dst}"][data-verdict="${verdict}"]`;
}

// A browser server, for its process id; Playwright starts it in its own process group,
// which the caller kills should this script die before closing it.
const server = await chromium.launchServer({
  executablePath,
  headless: true,
  // As root Chromium needs --no-sandbox; the rest keep it off the network (it would
  // otherwise try to reach update and sync hosts).
  args: ['--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-default-apps', '--disable-extensions'],
  timeout: STEP_MS,
});
console.log(JSON.stringify({ chromium_pid: server.process().pid }));
let failed = null;
let browser = null;
try {
  browser = await chromium.connect(server.wsEndpoint(), { timeout: STEP_MS });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  page.setDefaultTimeout(STEP_MS);
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(m.text()); });
  // Nothing but the page's own origin may be asked for (assets are in the binary).
  const foreign = [];
  await page.route('**/*', (route) => {
    if (route.request().url().startsWith(url)) return route.continue();
    foreign.push(route.request().url());
    return route.abort();
  });

  await page.goto(url);
  await page.waitForSelector('body[data-loaded="true"]');
  const allowed = page.locator(edge('default/frontend', 'default/backend', 'FORWARDED'));
  const dropped = page.locator(edge('default/frontend', 'default/backend', 'DROPPED'));
  const droppedOther = page.locator(edge('default/other', 'default/backend', 'DROPPED'));
  await allowed.waitFor();
  await dropped.waitFor();
  await droppedOther.waitFor();
  // other -> backend was forwarded at other's egress (not enforced) and dropped at
  // backend's ingress: one dropped connection, no forwarded edge.
  const otherForwarded = await page.locator(edge('default/other', 'default/backend', 'FORWARDED')).count();
  const result = {
    other_forwarded_edges: otherForwarded,
    allowed_edge_count: Number(await allowed.getAttribute('data-count')),
    dropped_edge_count: Number(await dropped.getAttribute('data-count')),
    dropped_edge_records: Number(await dropped.getAttribute('data-records')),
    dropped_other_edge_count: Number(await droppedOther.getAttribute('data-count')),
    allowed_edge_colour: await allowed.locator('path.line').evaluate((p) => getComputedStyle(p).stroke),
    dropped_edge_colour: await dropped.locator('path.line').evaluate((p) => getComputedStyle(p).stroke),
  };

  // Open the drop: the edge, then its newest flow in the table, then the explanation.
  await dropped.locator('text').click(); // the count, at the curve's middle
  await page.waitForSelector('#clear-edge');
  const rows = page.locator('#flows tbody tr');
  result.edge_rows = await rows.count();
  result.edge_row_verdicts = [...new Set(await rows.evaluateAll((trs) => trs.map((t) => t.dataset.verdict)))];
  await rows.first().click();
  await page.waitForSelector('#explain .default-deny-by li');
  result.drop_title = await page.locator('#panel-title').textContent();
  result.drop_decided_by = await page.locator('#panel-body dl').textContent();
  result.explain_ingress_decision = await page.locator('#explain .side.ingress .decision').textContent();
  result.default_deny_by = await page.locator('#explain .default-deny-by li').allTextContents();
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  // The pod panel of default/backend.
  await page.locator('g.node[data-key="default/backend"]').click();
  await page.waitForSelector('.pod-policies li');
  result.pod_title = await page.locator('#panel-title').textContent();
  result.pod_policies = await page.locator('.pod-policies li').allTextContents();
  result.pod_entries = await page.locator('#pod-entries tbody tr').count();
  result.pod_panel = await page.locator('#panel-body dl').textContent();

  // The observe filters: only drops, so the allowed edge goes away.
  await page.locator('#filter').fill('--verdict DROPPED');
  await page.locator('#filter-form button').click();
  await allowed.waitFor({ state: 'detached' });
  await dropped.waitFor();
  result.filtered_verdicts = [...new Set(await page.locator('#flows tbody tr').evaluateAll((trs) => trs.map((t) => t.dataset.verdict)))];
  // (Before the bad filter: Chromium logs its 400 answer as a console error.)
  result.page_errors = [...pageErrors];
  // A bad filter says what is wrong.
  await page.locator('#filter').fill('--verdikt DROPPED');
  await page.locator('#filter-form button').click();
  await page.waitForSelector('#error:not([hidden])');
  result.bad_filter_error = await page.locator('#error').textContent();

  result.foreign_requests = foreign;
  console.log(JSON.stringify({ result }));
} catch (e) {
  failed = e;
} finally {
  await browser?.close().catch(() => {});
  await server.close();
}
if (failed) {
  console.error(`ui_check: ${failed.stack || failed}`);
  process.exit(1);
}
