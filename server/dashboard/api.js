// The dashboard's only way to the daemon: the public REST API under /v1 and its server-sent
// events, exactly as scripts use them. Reads are open; changes carry the bearer token, asked
// once (on the first 401) and kept in this tab's session storage.

const TOKEN_KEY = "espalier-token";

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

/** Asks for the token in the page's dialog; resolves to true when one was saved. */
export function askToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  input.value = token();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const saved = dialog.returnValue === "save" && input.value.trim() !== "";
      if (saved) sessionStorage.setItem(TOKEN_KEY, input.value.trim());
      resolve(saved);
    }, { once: true });
    dialog.showModal();
  });
}

/** An API error with the daemon's message (its error body: {error: {kind, message}}). */
export class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

async function failure(response) {
  let kind = "http-" + response.status;
  let message = response.status + " " + response.statusText;
  try {
    const body = await response.json();
    if (body && body.error) {
      kind = body.error.kind;
      message = body.error.message;
    }
  } catch (_) { /* not JSON: keep the status line */ }
  return new ApiError(response.status, kind, message);
}

/** GET a JSON resource. */
export async function get(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  if (!response.ok) throw await failure(response);
  return response.json();
}

/** A call that changes something: sends the token; on 401 asks for it once and retries. */
export async function change(method, path, body, contentType = "application/json") {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = { Accept: "application/json" };
    if (token()) headers.Authorization = "Bearer " + token();
    if (body !== undefined) headers["Content-Type"] = contentType;
    const payload = body === undefined || contentType !== "application/json" ? body : JSON.stringify(body);
    const response = await fetch(path, { method, headers, body: payload });
    if (response.status === 401 && attempt === 0) {
      if (await askToken()) continue;
    }
    if (!response.ok) throw await failure(response);
    const text = await response.text();
    return text ? JSON.parse(text) : null;
  }
  throw new ApiError(401, "unauthorized", "this change needs the daemon's token");
}
