// End-to-end check of the portal page (GET /, /portal.js) in a real Chromium with its own
// WebAuthn stack, driven by playwright-core; passkeys come from CDP virtual authenticators.
// tests/portal_browser.rs runs it against a real `edgecoder portal`:
//
//   node tests/portal_browser.mjs http://localhost:<port>
//
// The base URL may also come from EC_PORTAL_URL. It must be on `localhost` (the portal's rp_id in
// the test), not 127.0.0.1. CHROMIUM overrides the browser (default /usr/bin/chromium);
// SCREENSHOT, when set, is where a screenshot of the final page goes (and of the signed-out page,
// with -signed-out before .png). Prints "all portal browser checks passed" on success; exits 1
// with the reason otherwise.
import { createRequire } from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.cwd(), "noop.js"));
let chromium;
try {
  ({ chromium } = require("playwright-core"));
} catch (e) {
  console.error(
    `playwright-core is not installed (${e.message}); ` +
      "`npm install --prefix target/js-sdk playwright-core@1` and run with NODE_PATH=target/js-sdk/node_modules",
  );
  process.exit(1);
}

const base = (process.argv[2] || process.env.EC_PORTAL_URL || "").replace(/\/+$/, "");
if (!/^http:\/\/localhost:\d+$/.test(base)) {
  console.error(`usage: node portal_browser.mjs http://localhost:<port> (got ${JSON.stringify(base)})`);
  process.exit(2);
}
const executablePath = process.env.CHROMIUM || "/usr/bin/chromium";
const STEP_MS = 20_000;

class CheckFailed extends Error {}
function check(cond, what) {
  if (!cond) throw new CheckFailed(what);
  console.log(`ok: ${what}`);
}

let browser;
const logs = [];
let step = "launching Chromium";
try {
  browser = await chromium.launch({
    executablePath,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  const context = await browser.newContext({ locale: "en-US", timezoneId: "UTC" });
  context.setDefaultTimeout(STEP_MS);
  const page = await context.newPage();
  page.on("console", (m) => logs.push(`console.${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));

  const cdp = await context.newCDPSession(page);
  await cdp.send("WebAuthn.enable", { enableUI: false });
  const authenticator = async () =>
    (
      await cdp.send("WebAuthn.addVirtualAuthenticator", {
        options: {
          protocol: "ctap2",
          transport: "internal",
          hasResidentKey: true,
          hasUserVerification: true,
          isUserVerified: true,
          automaticPresenceSimulation: true,
        },
      })
    ).authenticatorId;
  const credentials = async (id) =>
    (await cdp.send("WebAuthn.getCredentials", { authenticatorId: id })).credentials;

  const statusText = () => page.locator("#status").textContent();
  const statusIsError = () => page.locator("#status").evaluate((s) => s.classList.contains("error"));
  const rows = () => page.locator("#passkeys tr");
  // Waits until the status line says `text` (and is not an error), failing with what it says.
  const waitStatus = async (text) => {
    try {
      await page.waitForFunction(
        (t) => {
          const s = document.getElementById("status");
          return s.textContent === t || s.classList.contains("error");
        },
        text,
        { timeout: STEP_MS },
      );
    } catch {
      /* reported below */
    }
    const [got, err] = [await statusText(), await statusIsError()];
    check(got === text && !err, `status says ${JSON.stringify(text)} (it says ${JSON.stringify(got)}${err ? ", as an error" : ""})`);
  };
  const signedIn = async (name, username, passkeys) => {
    await page.locator("#signed-in").waitFor({ state: "visible" });
    check(await page.locator("#signed-out").isHidden(), "the signed-out section is hidden");
    check((await page.locator("#me-name").textContent()) === name, `signed in as ${name}`);
    check((await page.locator("#me-username").textContent()) === username, `with user name ${username}`);
    await page.waitForFunction((n) => document.querySelectorAll("#passkeys tr").length === n, passkeys).catch(() => {});
    check((await rows().count()) === passkeys, `${passkeys} passkey row(s) shown (${await rows().count()})`);
  };
  const signedOut = async () => {
    await page.locator("#signed-out").waitFor({ state: "visible" });
    check(await page.locator("#signed-in").isHidden(), "the signed-in section is hidden");
  };

  const auth1 = await authenticator();

  step = "opening the page";
  const resp = await page.goto(base + "/");
  check(resp && resp.status() === 200, `GET / answers 200 (${resp && resp.status()})`);
  const csp = resp.headers()["content-security-policy"] || "";
  check(/script-src 'self'/.test(csp) && /frame-ancestors 'none'/.test(csp), `GET / carries a Content-Security-Policy (${csp})`);
  check(await page.evaluate(() => !!window.PublicKeyCredential), "the browser has WebAuthn");
  await signedOut();
  check((await page.title()) === "EdgeCoder portal", "the page's title");
  if (process.env.SCREENSHOT) {
    const shot = process.env.SCREENSHOT.replace(/(\.png)?$/, "-signed-out.png");
    await page.screenshot({ path: shot, fullPage: true });
    console.log(`screenshot: ${shot}`);
  }

  step = "creating an account";
  await page.fill("#username", "alice");
  await page.fill("#display-name", "Alice");
  await page.click("#register");
  await waitStatus("Account created; you are signed in.");
  await signedIn("Alice", "alice", 1);
  const creds1 = await credentials(auth1);
  check(
    creds1.length === 1 && creds1[0].isResidentCredential && creds1[0].rpId === "localhost",
    `the authenticator holds one resident credential for rpId localhost (${JSON.stringify(creds1.map((c) => ({ rpId: c.rpId, resident: c.isResidentCredential })))})`,
  );
  const cookies = await context.cookies(base);
  const session = cookies.find((c) => c.name === "edgecoder_portal_session");
  check(session && session.httpOnly && session.sameSite === "Strict", "the session cookie is HttpOnly and SameSite=Strict");
  check(!(await page.evaluate(() => document.cookie)).includes("edgecoder_portal_session"), "the session cookie is not visible to scripts");

  step = "reloading while signed in";
  await page.reload();
  await signedIn("Alice", "alice", 1);

  step = "signing out";
  await page.click("#logout");
  await waitStatus("Signed out.");
  await signedOut();
  check(!(await context.cookies(base)).some((c) => c.name === "edgecoder_portal_session" && c.value), "the session cookie is gone");

  step = "signing in with the discoverable passkey";
  await page.click("#login");
  await waitStatus("Signed in.");
  await signedIn("Alice", "alice", 1);
  check((await credentials(auth1))[0].signCount >= 1, "the authenticator signed (its counter moved)");

  step = "adding the same authenticator again (excluded)";
  await page.click("#add-passkey");
  await page.waitForFunction(() => document.getElementById("status").classList.contains("error")).catch(() => {});
  const refused = await statusText();
  check(await statusIsError(), `adding a passkey from the same authenticator is refused with an error (${JSON.stringify(refused)})`);
  check((await credentials(auth1)).length === 1, "the first authenticator still holds one credential");
  await signedIn("Alice", "alice", 1);

  step = "adding a passkey from a second authenticator";
  // Chrome allows one `internal` authenticator at a time: the first goes (as if the user moved
  // to another device), so only the new one can answer.
  await cdp.send("WebAuthn.removeVirtualAuthenticator", { authenticatorId: auth1 });
  const auth2 = await authenticator();
  await page.click("#add-passkey");
  await waitStatus("Passkey added.");
  await signedIn("Alice", "alice", 2);
  const creds2 = await credentials(auth2);
  check(creds2.length === 1 && creds2[0].isResidentCredential && creds2[0].rpId === "localhost", "the second authenticator holds a resident credential for localhost");

  step = "signing in with the second passkey";
  await page.click("#logout");
  await waitStatus("Signed out.");
  await signedOut();
  await page.click("#login");
  await waitStatus("Signed in.");
  await signedIn("Alice", "alice", 2);
  const used = await rows().evaluateAll((trs) => trs.filter((tr) => tr.cells[2].textContent !== "never").length);
  check(used === 2, `both passkeys show when they were last used (${used})`);

  const cspViolations = logs.filter((l) => /Content Security Policy/i.test(l));
  check(cspViolations.length === 0, `no Content-Security-Policy violations (${cspViolations.join("; ")})`);
  const pageErrors = logs.filter((l) => l.startsWith("pageerror"));
  check(pageErrors.length === 0, `no uncaught page errors (${pageErrors.join("; ")})`);

  if (process.env.SCREENSHOT) {
    await page.screenshot({ path: process.env.SCREENSHOT, fullPage: true });
    console.log(`screenshot: ${process.env.SCREENSHOT}`);
  }
  await browser.close();
  console.log("all portal browser checks passed");
} catch (e) {
  const what = e instanceof CheckFailed ? `check failed: ${e.message}` : `error: ${e.stack || e}`;
  console.error(`portal browser test failed while ${step}: ${what}`);
  if (logs.length) console.error(`browser console:\n  ${logs.join("\n  ")}`);
  if (browser) await browser.close().catch(() => {});
  process.exit(1);
}
