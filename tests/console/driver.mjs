// Drives headless Chromium with playwright-core for tests/tests/it/console.rs, one command at a
// time: each line on stdin is a JSON command {id, cmd, ...}, each answer one JSON line on stdout
// {id, ok, value | error}. Records what the page says (console messages, page errors, dialogs)
// so the test can assert that no injected script ran.
//
// Environment: ACME_TEST_CHROMIUM (the browser), ACME_TEST_PLAYWRIGHT_DIR (a directory whose
// node_modules holds playwright-core; scripts/services.sh ensure_playwright installs it).
import { createRequire } from "node:module";
import readline from "node:readline";

const require = createRequire(process.env.ACME_TEST_PLAYWRIGHT_DIR.replace(/\/?$/, "/"));
const { chromium } = require("playwright-core");

const browser = await chromium.launch({
  executablePath: process.env.ACME_TEST_CHROMIUM || "chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--no-first-run"],
});
const context = await browser.newContext({ viewport: { width: 1360, height: 1000 } });
const page = await context.newPage();
const messages = [];
const dialogs = [];
page.on("console", (m) => messages.push({ type: m.type(), text: m.text() }));
page.on("pageerror", (e) => messages.push({ type: "pageerror", text: String(e) }));
// A native alert/confirm would be a script's doing (the console uses a <dialog> element).
page.on("dialog", async (d) => { dialogs.push({ type: d.type(), message: d.message() }); await d.dismiss(); });

const commands = {
  async goto({ url }) {
    const response = await page.goto(url, { waitUntil: "load" });
    return { status: response ? response.status() : null, url: page.url() };
  },
  async fill({ selector, value }) { await page.fill(selector, value); return null; },
  async select({ selector, value }) { await page.selectOption(selector, value); return null; },
  async click({ selector }) { await page.click(selector); return null; },
  // Clicks and waits for the navigation it starts.
  async clickAndWait({ selector }) {
    const [response] = await Promise.all([page.waitForNavigation({ waitUntil: "load" }), page.click(selector)]);
    return { status: response ? response.status() : null, url: page.url() };
  },
  async text({ selector }) { return await page.textContent(selector); },
  async count({ selector }) { return await page.locator(selector).count(); },
  async attribute({ selector, name }) { return await page.getAttribute(selector, name); },
  async url() { return page.url(); },
  // Waits until the text of `selector` matches `pattern` (a regular expression).
  async waitForText({ selector, pattern, timeoutMs }) {
    const re = new RegExp(pattern);
    const deadline = Date.now() + (timeoutMs || 30000);
    let last = null;
    while (Date.now() < deadline) {
      try { last = await page.textContent(selector, { timeout: 1000 }); } catch (_) { last = null; }
      if (last !== null && re.test(last)) return last;
      await page.waitForTimeout(200);
    }
    throw new Error(`${selector} never matched /${pattern}/; last text: ${JSON.stringify(last)}`);
  },
  async waitForSelector({ selector, timeoutMs }) {
    await page.waitForSelector(selector, { timeout: timeoutMs || 30000 });
    return null;
  },
  async evaluate({ expression }) { return await page.evaluate(expression); },
  async screenshot({ path, fullPage }) {
    await page.screenshot({ path, fullPage: fullPage !== false });
    return path;
  },
  async cookies() { return await context.cookies(); },
  async html() { return await page.content(); },
  async log() { return { messages, dialogs }; },
  async close() { await browser.close(); return null; },
};

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let request;
  try { request = JSON.parse(line); } catch (e) { continue; }
  const handler = commands[request.cmd];
  let answer;
  try {
    if (!handler) throw new Error("unknown command " + request.cmd);
    answer = { id: request.id, ok: true, value: await handler(request) };
  } catch (error) {
    answer = { id: request.id, ok: false, error: String(error && error.stack ? error.stack : error) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
  if (request.cmd === "close") break;
}
process.exit(0);
