// EdgeCoder portal page: passkey sign-up, sign-in and sign-out against the portal's JSON API
// (docs/api/portal.md). No framework, no third-party code.
"use strict";

const $ = (id) => document.getElementById(id);

function status(text, isError) {
  const s = $("status");
  s.textContent = text || "";
  s.className = isError ? "error" : "";
}

async function api(method, path, body) {
  const r = await fetch(path, {
    method,
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
    credentials: "same-origin",
  });
  const text = await r.text();
  const data = text ? JSON.parse(text) : null;
  if (!r.ok) {
    const e = new Error((data && data.error && data.error.message) || r.statusText);
    e.status = r.status;
    throw e;
  }
  return data;
}

// base64url <-> ArrayBuffer, for browsers without the WebAuthn JSON helpers.
function fromB64(s) {
  const b = atob(s.replace(/-/g, "+").replace(/_/g, "/") + "==".slice(0, (4 - (s.length % 4)) % 4));
  return Uint8Array.from(b, (c) => c.charCodeAt(0)).buffer;
}
function toB64(buf) {
  let s = "";
  for (const byte of new Uint8Array(buf)) s += String.fromCharCode(byte);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

function creationOptions(o) {
  if (window.PublicKeyCredential && PublicKeyCredential.parseCreationOptionsFromJSON) {
    return PublicKeyCredential.parseCreationOptionsFromJSON(o);
  }
  return {
    ...o,
    challenge: fromB64(o.challenge),
    user: { ...o.user, id: fromB64(o.user.id) },
    excludeCredentials: (o.excludeCredentials || []).map((c) => ({ ...c, id: fromB64(c.id) })),
  };
}

function requestOptions(o) {
  if (window.PublicKeyCredential && PublicKeyCredential.parseRequestOptionsFromJSON) {
    return PublicKeyCredential.parseRequestOptionsFromJSON(o);
  }
  return {
    ...o,
    challenge: fromB64(o.challenge),
    allowCredentials: (o.allowCredentials || []).map((c) => ({ ...c, id: fromB64(c.id) })),
  };
}

function credentialJSON(c) {
  if (typeof c.toJSON === "function") return c.toJSON();
  const r = c.response;
  const response = { clientDataJSON: toB64(r.clientDataJSON) };
  if (r.attestationObject) response.attestationObject = toB64(r.attestationObject);
  if (r.authenticatorData) response.authenticatorData = toB64(r.authenticatorData);
  if (r.signature) response.signature = toB64(r.signature);
  if (r.userHandle) response.userHandle = toB64(r.userHandle);
  return { id: c.id, rawId: toB64(c.rawId), type: c.type, response, clientExtensionResults: {} };
}

async function register(addToAccount) {
  const body = {};
  if (!addToAccount) {
    body.username = $("username").value.trim();
    const d = $("display-name").value.trim();
    if (d) body.display_name = d;
  }
  status("Creating a passkey…");
  const opts = await api("POST", "/auth/register/options", body);
  const cred = await navigator.credentials.create({ publicKey: creationOptions(opts.publicKey) });
  await api("POST", "/auth/register/verify", { ceremony: opts.ceremony, credential: credentialJSON(cred) });
  status(addToAccount ? "Passkey added." : "Account created; you are signed in.");
  await refresh();
}

async function login() {
  status("Waiting for your passkey…");
  const opts = await api("POST", "/auth/login/options", {});
  const cred = await navigator.credentials.get({ publicKey: requestOptions(opts.publicKey) });
  await api("POST", "/auth/login/verify", { ceremony: opts.ceremony, credential: credentialJSON(cred) });
  status("Signed in.");
  await refresh();
}

async function logout() {
  await api("POST", "/auth/logout");
  status("Signed out.");
  await refresh();
}

async function refresh() {
  let me = null;
  try {
    me = await api("GET", "/me");
  } catch (e) {
    if (e.status !== 401) throw e;
  }
  $("signed-in").hidden = !me;
  $("signed-out").hidden = !!me;
  if (!me) return;
  $("me-name").textContent = me.user.display_name;
  $("me-username").textContent = me.user.username;
  const rows = me.passkeys.map((p) => {
    const tr = document.createElement("tr");
    const alg = p.alg === -8 ? "Ed25519" : p.alg === -7 ? "ES256" : String(p.alg);
    const used = p.last_used_ms ? new Date(p.last_used_ms).toLocaleString() : "never";
    for (const [text, isCode] of [[p.id.slice(0, 16) + "…", true], [alg, false], [used, false]]) {
      const td = document.createElement("td");
      const el = isCode ? document.createElement("code") : td;
      el.textContent = text;
      if (isCode) td.appendChild(el);
      tr.appendChild(td);
    }
    return tr;
  });
  $("passkeys").replaceChildren(...rows);
}

function guard(f) {
  return () => f().catch((e) => status(e.message || String(e), true));
}

$("register").addEventListener("click", guard(() => register(false)));
$("add-passkey").addEventListener("click", guard(() => register(true)));
$("login").addEventListener("click", guard(login));
$("logout").addEventListener("click", guard(logout));
if (!window.PublicKeyCredential) status("This browser does not support passkeys.", true);
guard(refresh)();
