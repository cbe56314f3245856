// Drives the broker's status page in a real headless Chromium (Debian's, through
// playwright-core from npm) and prints what the page shows as one JSON line, for
// tests/tests/http_api.rs to compare with the broker's own figures.
//
// Environment: NODE_MODULES (with playwright-core), CHROMIUM (the browser), BASE
// (http://host:port), USER_NAME and PASSWORD (a broker user), SHOT (where the phone-size
// screenshot goes), LIVE_ID (a message id this script sends through the HTTP API once the page
// is up; the page must show it without being reloaded).
"use strict";
const { chromium } = require(process.env.NODE_MODULES + "/playwright-core");

const env = (k) => {
  if (!process.env[k]) { throw new Error("missing " + k); }
  return process.env[k];
};

(async () => {
  const base = env("BASE");
  const browser = await chromium.launch({
    executablePath: env("CHROMIUM"),
    args: ["--no-sandbox", "--disable-dev-shm-usage"],
  });
  const out = { offsite: [], consoleErrors: [] };
  try {
    // Without credentials: refused, and nothing of the page.
    const anon = await browser.newContext();
    const r = await anon.request.get(base + "/status");
    out.anonymousStatus = r.status();
    out.anonymousShowsPage = (await r.text()).includes("WSMB status");
    await anon.close();

    // A phone.
    const ctx = await browser.newContext({
      httpCredentials: { username: env("USER_NAME"), password: env("PASSWORD") },
      viewport: { width: 390, height: 844 },
      deviceScaleFactor: 2,
      isMobile: true,
      hasTouch: true,
    });
    const page = await ctx.newPage();
    page.on("console", (m) => { if (m.type() === "error") { out.consoleErrors.push(m.text()); } });
    page.on("pageerror", (e) => out.consoleErrors.push(String(e)));
    // Offline: any request elsewhere than the broker is recorded and refused.
    await page.route("**/*", (route) => {
      const u = route.request().url();
      if (u.startsWith(base + "/")) { return route.continue(); }
      out.offsite.push(u);
      return route.abort();
    });
    const resp = await page.goto(base + "/status");
    out.pageStatus = resp.status();
    out.csp = resp.headers()["content-security-policy"] || "";
    await page.waitForFunction(() => Number(document.body.dataset.updates || 0) >= 1, null, { timeout: 20000 });

    out.view = await page.evaluate(() => {
      const q = (s, root) => (root || document).querySelector(s);
      const text = (s, root) => { const e = q(s, root); return e ? e.textContent.trim() : null; };
      const channels = {};
      document.querySelectorAll("#channels tr[data-channel]").forEach((tr) => {
        const v = {};
        tr.querySelectorAll("td[data-k]").forEach((td) => { v[td.dataset.k] = Number(td.textContent); });
        channels[tr.dataset.channel] = v;
      });
      const gateways = {};
      document.querySelectorAll("[data-gateway]").forEach((g) => {
        const modems = {};
        g.querySelectorAll("[data-modem]").forEach((m) => {
          const v = { state: text(".badge", m) };
          m.querySelectorAll("dd[data-k]").forEach((dd) => { v[dd.dataset.k] = dd.textContent.trim(); });
          modems[m.dataset.modem] = v;
        });
        gateways[g.dataset.gateway] = { online: text("h3 .badge", g), meta: text(".meta", g), modems };
      });
      const rows = (sel) => Array.from(document.querySelectorAll(sel + " tr[data-message]")).map((tr) => {
        const v = { id: tr.dataset.message };
        tr.querySelectorAll("td[data-k]").forEach((td) => { v[td.dataset.k] = td.textContent.trim(); });
        return v;
      });
      const totals = {};
      document.querySelectorAll("#legend li[data-series]").forEach((li) => {
        totals[li.dataset.series] = Number(text("[data-k=total]", li));
      });
      const lines = {};
      document.querySelectorAll("#chart polyline[data-series]").forEach((p) => {
        lines[p.dataset.series] = p.getAttribute("points").trim().split(/\s+/).length;
      });
      const checks = {};
      document.querySelectorAll("#checks li[data-check]").forEach((li) => { checks[li.dataset.check] = li.textContent.trim(); });
      return {
        overall: text("#overall"),
        tiles: { stored: text("#t-stored"), gateways: text("#t-gateways"), sent: text("#t-sent"), failed: text("#t-failed") },
        channels, gateways, messages: rows("#messages"), failures: rows("#failures"), totals, lines, checks,
        injected: document.querySelectorAll("#channels img, #channels script").length,
        overflow: document.documentElement.scrollWidth - window.innerWidth,
      };
    });
    await page.screenshot({ path: env("SHOT"), fullPage: true });

    // Live: a message sent now appears without a reload.
    const before = await page.evaluate(() => Number(document.body.dataset.updates));
    const api = await ctx.request.post(base + "/3rdparty/v1/messages", {
      data: { id: env("LIVE_ID"), textMessage: { text: "live check" }, phoneNumbers: ["+628126666666"] },
    });
    out.liveApiStatus = api.status();
    await page.waitForSelector('#messages tr[data-message="' + env("LIVE_ID") + '"]', { timeout: 30000 });
    out.liveAfterUpdates = (await page.evaluate(() => Number(document.body.dataset.updates))) - before;
    out.reloaded = await page.evaluate(() => performance.getEntriesByType("navigation").length !== 1);
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(out));
})().catch((e) => { console.error(e && e.stack ? e.stack : e); process.exit(1); });
