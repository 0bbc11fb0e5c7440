// End-to-end test of the browser console in Debian's Chromium, driven by playwright-core
// against a running mesh. Run by tests/integration/test_browser_console.py, which starts the
// mesh and passes: EDGE_URL, TENANT (a tenant with documents), EXPIRED_TOKEN, ARTIFACTS (a
// folder for screenshots), QUESTION. Prints one JSON line of findings; exits non-zero on failure.
import { chromium } from "playwright-core";
import { mkdirSync } from "node:fs";
import { join } from "node:path";

const { EDGE_URL, TENANT, EXPIRED_TOKEN, ARTIFACTS, QUESTION } = process.env;
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const STEP_TIMEOUT_MS = 20_000;

mkdirSync(ARTIFACTS, { recursive: true });
const findings = {};
const browser = await chromium.launch({ executablePath: CHROMIUM, args: FLAGS, headless: true, timeout: 30_000 });
const page = await browser.newPage({ viewport: { width: 1100, height: 900 } });
page.setDefaultTimeout(STEP_TIMEOUT_MS);
const consoleErrors = [];
page.on("pageerror", (err) => consoleErrors.push(String(err)));
const shot = (name) => page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });

try {
  // 1. The page loads, with the dev sign-in offering the tenant.
  await page.goto(EDGE_URL + "/", { waitUntil: "load" });
  await page.getByRole("heading", { name: "Sign in" }).waitFor();
  await page.locator(`#dev-tenant option[value="${TENANT}"]`).waitFor({ state: "attached" });
  await shot("01-sign-in");
  findings.signOutShownSignedOut = await page.isVisible("#sign-out");

  // 2. Sign in as an administrator of the tenant.
  await page.selectOption("#dev-tenant", TENANT);
  await page.check("#dev-admin");
  await page.getByRole("button", { name: "Get a token and sign in" }).click();
  await page.getByRole("heading", { name: "Ask" }).waitFor();
  findings.who = await page.textContent("#who-text");
  // Usage and quota load on sign-in.
  await page.locator("#usage tbody tr").first().waitFor();
  findings.usageRows = await page.locator("#usage tbody tr").count();
  await shot("02-signed-in");

  // 3. Ask: count how often the answer's text changes while it streams in.
  await page.evaluate(() => {
    window.__answerUpdates = 0;
    new MutationObserver(() => { window.__answerUpdates += 1; })
      .observe(document.getElementById("answer"), { childList: true, characterData: true, subtree: true });
  });
  await page.fill("#question", QUESTION);
  await page.getByRole("button", { name: "Ask", exact: true }).click();
  await page.locator("#citations li").first().waitFor();
  findings.answer = (await page.textContent("#answer")).trim();
  findings.answerUpdates = await page.evaluate(() => window.__answerUpdates);
  findings.citations = await page.locator("#citations li").count();
  findings.inlineCitations = await page.locator("#answer button.cite").count();
  findings.verdict = (await page.textContent("#verdict")).trim();
  await shot("03-answer");

  // 4. A citation opens the cited passage.
  await page.locator("#citations li button").first().click();
  await page.locator("#passage[open]").waitFor();
  findings.passageTitle = await page.textContent("#passage-title");
  findings.passageText = (await page.textContent("#passage-text")).trim();
  findings.passageMarked = (await page.locator("#passage-text mark").allTextContents()).map((t) => t.trim());
  findings.passageSpan = (await page.textContent("#passage-span")).trim();
  findings.passageAccess = (await page.textContent("#passage-access")).trim();
  await shot("04-passage");
  await page.getByRole("button", { name: "Close" }).click();

  // 5. Upload a document (admin).
  await page.setInputFiles("#files", { name: "browser-upload.md", mimeType: "text/markdown",
    buffer: Buffer.from("# Browser upload\n\nDocuments uploaded from the console are searchable at once.\n") });
  await page.getByRole("button", { name: "Upload", exact: true }).click();
  await page.waitForFunction(() => document.getElementById("upload-result").textContent.includes("Uploaded"));
  findings.upload = await page.textContent("#upload-result");

  // 6. An expired token: the next request is refused, and the page says so in words.
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.fill("#token", EXPIRED_TOKEN);
  await page.getByRole("button", { name: "Sign in with this token" }).click();
  await page.locator("#error:not([hidden])").waitFor();
  findings.expiredError = (await page.textContent("#error")).trim();
  await page.fill("#question", QUESTION);
  await page.getByRole("button", { name: "Ask", exact: true }).click();
  await page.waitForFunction(() => document.getElementById("error").textContent.includes("no longer valid"));
  await shot("05-expired");
  findings.pageErrors = consoleErrors;
  console.log(JSON.stringify({ ok: true, ...findings }));
} catch (err) {
  await shot("99-failure").catch(() => {});
  console.log(JSON.stringify({ ok: false, error: String(err && err.stack || err), ...findings }));
  process.exitCode = 1;
} finally {
  await browser.close();
}
