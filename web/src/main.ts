// The browser console: sign in, ask (streamed answer with numbered citations), upload
// documents (admins), usage and quota. Talks gRPC-Web to the Envoy edge with the
// generated protobuf-es types; the token travels in the Authorization header only.
import { Code, ConnectError, createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { GenerationService } from "../../gen/ts/copilot/v1/generation_pb";
import type { Citation } from "../../gen/ts/copilot/v1/common_pb";
import type { AnswerDetails, CitedSpan } from "../../gen/ts/copilot/v1/generation_pb";
import { Plan } from "../../gen/ts/copilot/v1/common_pb";
import { MeteringService } from "../../gen/ts/copilot/v1/metering_pb";
import { IngestStatus, RetrievalService } from "../../gen/ts/copilot/v1/retrieval_pb";
import { TenantService, TenantState } from "../../gen/ts/copilot/v1/tenant_pb";

const TOKEN_KEY = "copilot.token";
const MAX_FILE_BYTES = 2 * 1024 * 1024;

function $<T extends HTMLElement>(id: string): T {
  const el = document.getElementById(id);
  if (!el) throw new Error(`missing #${id}`);
  return el as T;
}

// -- the token and what it says (for display only: the edge verifies it)

interface Claims { tenant_id?: string; sub?: string; roles?: string[] | string; exp?: number }

function claimsOf(token: string): Claims | null {
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const json = atob(part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "="));
    const value: unknown = JSON.parse(json);
    return typeof value === "object" && value !== null ? (value as Claims) : null;
  } catch {
    return null;
  }
}

function rolesOf(claims: Claims): string[] {
  const roles = claims.roles ?? [];
  return Array.isArray(roles) ? roles.map(String) : String(roles).split(/[\s,]+/).filter(Boolean);
}

let token: string | null = sessionStorage.getItem(TOKEN_KEY);

const auth: Interceptor = (next) => async (req) => {
  if (token) req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};
const transport = createGrpcWebTransport({ baseUrl: window.location.origin, interceptors: [auth] });
const generation: Client<typeof GenerationService> = createClient(GenerationService, transport);
const retrieval: Client<typeof RetrievalService> = createClient(RetrievalService, transport);
const metering: Client<typeof MeteringService> = createClient(MeteringService, transport);
const tenants: Client<typeof TenantService> = createClient(TenantService, transport);

// -- errors, in words

function describe(err: unknown): string {
  if (!(err instanceof ConnectError)) {
    return `Something went wrong: ${err instanceof Error ? err.message : String(err)}`;
  }
  const why = err.rawMessage ? ` (${err.rawMessage})` : "";
  switch (err.code) {
    case Code.Unauthenticated:
      return "Your sign-in is no longer valid: the token has expired or was not accepted. Please sign in again.";
    case Code.PermissionDenied:
      return `You are not allowed to do this${why}.`;
    case Code.ResourceExhausted:
      return `Your organisation has reached its limit for now${why}. Please wait a moment and try again.`;
    case Code.InvalidArgument:
      return `The request was not accepted${why}.`;
    case Code.NotFound:
      return `Not found${why}.`;
    case Code.Unavailable:
      return "The service cannot be reached right now. Please try again shortly.";
    case Code.DeadlineExceeded:
      return "This took too long to answer. Please try again.";
    case Code.Canceled:
      return "The request was cancelled.";
    default:
      return `Something went wrong on our side${why}.`;
  }
}

function showError(err: unknown): void {
  const box = $("error");
  box.textContent = describe(err);
  box.hidden = false;
}

function clearError(): void {
  $("error").hidden = true;
  $("error").textContent = "";
}

async function busy<T>(button: HTMLButtonElement, work: () => Promise<T>): Promise<T | undefined> {
  button.disabled = true;
  clearError();
  try {
    return await work();
  } catch (err) {
    showError(err);
    return undefined;
  } finally {
    button.disabled = false;
  }
}

// -- sign in / out

function signIn(newToken: string): void {
  const claims = claimsOf(newToken);
  if (!claims?.tenant_id) {
    showError(new Error("this does not look like a Compliance Copilot token (it names no tenant)"));
    return;
  }
  token = newToken;
  sessionStorage.setItem(TOKEN_KEY, newToken);
  clearError();
  render();
  refreshUsage().catch(showError);
}

function signOut(): void {
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  // Nothing of the previous user's stays on the page.
  $("usage").querySelector("tbody")?.replaceChildren();
  $("answer").replaceChildren();
  $("citations").replaceChildren();
  $("answer-meta").textContent = "";
  $("upload-result").textContent = "";
  $("answer-box").hidden = true;
  $<HTMLTextAreaElement>("token").value = "";
  clearError();
  render();
}

function render(): void {
  const claims = token ? claimsOf(token) : null;
  const signedIn = Boolean(claims?.tenant_id);
  $("sign-in").hidden = signedIn;
  $("app").hidden = !signedIn;
  $("who").hidden = !signedIn;
  if (claims && signedIn) {
    const roles = rolesOf(claims);
    $("who-text").textContent = `${claims.sub ?? "user"} · ${claims.tenant_id} · ${roles.join(", ") || "no roles"}`;
    $("upload").hidden = !roles.some((r) => r === "admin" || r === "ingest" || r === "operator");
  }
}

async function setUpDevSignIn(): Promise<void> {
  let response: Response;
  try {
    response = await fetch("/dev/tenants", { headers: { accept: "application/json" } });
  } catch {
    return;
  }
  if (!response.ok) return; // not in development: only the token form
  const body = (await response.json()) as { tenants: { tenant_id: string; display_name: string }[] };
  const select = $<HTMLSelectElement>("dev-tenant");
  select.replaceChildren(...body.tenants.map((t) => new Option(`${t.display_name} (${t.tenant_id})`, t.tenant_id)));
  $("dev-form").hidden = body.tenants.length === 0;
  $("dev-or").hidden = body.tenants.length === 0;
}

async function devToken(tenantId: string, admin: boolean): Promise<string> {
  const response = await fetch("/dev/token", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ tenant_id: tenantId, roles: admin ? ["member", "admin"] : ["member"], user: "console" }),
  });
  const body = (await response.json()) as { token?: string; error?: string };
  if (!response.ok || !body.token) throw new Error(body.error ?? `the dev sign-in failed (${response.status})`);
  return body.token;
}

// -- ask

function citationButton(c: Citation): HTMLButtonElement {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "cite";
  button.textContent = `[${c.index}]`;
  button.setAttribute("aria-label", `Source ${c.index}: ${c.title || c.documentId}`);
  button.addEventListener("click", () => openPassage(c));
  return button;
}

// The exact spans of the current answer, by the citation they belong to.
let spansByCitation = new Map<number, CitedSpan[]>();

function readers(c: Citation): string {
  return c.access.length ? `Readable by ${c.access.join(", ")}` : "Readable by the whole tenant";
}

// The passage with the cited spans marked: a span is the document's original text, the passage
// the indexed chunk, so they are matched with whitespace made flexible.
function markedPassage(text: string, spans: CitedSpan[]): (string | Node)[] {
  const found: [number, number][] = [];
  for (const span of spans) {
    if (!span.text.trim()) continue;
    const pattern = span.text.trim().split(/\s+/).map((w) => w.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")).join("\\s+");
    const match = new RegExp(pattern).exec(text);
    if (match) found.push([match.index, match.index + match[0].length]);
  }
  found.sort((a, b) => a[0] - b[0]);
  const parts: (string | Node)[] = [];
  let at = 0;
  for (const [from, to] of found) {
    if (from < at) continue;  // overlaps the previous mark
    const mark = document.createElement("mark");
    mark.textContent = text.slice(from, to);
    parts.push(text.slice(at, from), mark);
    at = to;
  }
  parts.push(text.slice(at));
  return parts;
}

function openPassage(c: Citation): void {
  const spans = spansByCitation.get(c.index) ?? [];
  $("passage-title").textContent = `[${c.index}] ${c.title || c.documentId}`;
  $("passage-where").textContent = [c.section, c.source || c.documentId].filter(Boolean).join(" · ");
  $("passage-access").textContent = readers(c);
  $("passage-text").replaceChildren(...markedPassage(c.quote || "(no passage text)", spans));
  $("passage-span").textContent = spans.map((s) => s.end > s.start
    ? `Cited span: characters ${s.start}–${s.end} of the document` + (s.matchQuality < 1 ? ` (quote matched ${Math.round(s.matchQuality * 100)} %)` : "")
    : "Cited span: no offsets (the document predates them: re-ingest it)").join("\n");
  $<HTMLDialogElement>("passage").showModal();
}

function renderAnswer(text: string, details: AnswerDetails): void {
  const citations = details.citations;
  spansByCitation = new Map();
  for (const span of details.spans) {
    spansByCitation.set(span.citationIndex, [...(spansByCitation.get(span.citationIndex) ?? []), span]);
  }
  const byIndex = new Map(citations.map((c) => [c.index, c]));
  const answer = $("answer");
  const parts: (string | Node)[] = [];
  let last = 0;
  for (const match of text.matchAll(/\[(\d+)\]/g)) {
    const cited = byIndex.get(Number(match[1]));
    if (!cited || match.index === undefined) continue;
    parts.push(text.slice(last, match.index), citationButton(cited));
    last = match.index + match[0].length;
  }
  parts.push(text.slice(last));
  answer.replaceChildren(...parts);
  const list = $("citations");
  list.replaceChildren(...citations.map((c) => {
    const item = document.createElement("li");
    item.value = c.index;
    const open = citationButton(c);
    open.textContent = c.title || c.documentId;
    item.append(open, c.section ? ` — ${c.section}` : "");
    if (c.access.length) {
      const badge = document.createElement("span");
      badge.className = "access";
      badge.textContent = c.access.join(", ");
      badge.title = readers(c);
      item.append(badge);
    }
    return item;
  }));
  $("sources-title").hidden = citations.length === 0;
  renderVerdict(text, details);
}

// The groundedness verdict: the score, and each sentence its citations do not support.
function renderVerdict(text: string, details: AnswerDetails): void {
  const box = $("verdict");
  const sentences = details.sentences;
  if (!sentences.length) {
    box.replaceChildren();
    return;
  }
  const verdict = details.groundedness;
  const supported = sentences.length - (verdict?.unsupportedSentences ?? 0);
  const summary = document.createElement("p");
  summary.className = "meta";
  summary.textContent = `Groundedness ${(verdict?.score ?? 0).toFixed(2)}: ${supported} of ${sentences.length} ` +
    "sentences supported by what they cite" + (verdict?.refused ? " · refused: unsupported sentences" : "");
  const points = Array.from(text);  // offsets are in code points
  const list = document.createElement("ul");
  for (const s of sentences.filter((x) => !x.supported)) {
    const item = document.createElement("li");
    item.className = "unsupported";
    const quoted = s.end > s.start ? `“${points.slice(s.start, s.end).join("").trim()}” ` : "";
    item.textContent = `${s.removed ? "Removed" : "Unsupported"}: ${quoted}(${s.issues.join("; ") || "weak support"})`;
    list.append(item);
  }
  box.replaceChildren(summary, ...(list.childElementCount ? [list] : []));
}

async function ask(question: string): Promise<void> {
  const answer = $("answer");
  $("answer-box").hidden = false;
  answer.textContent = "";
  answer.setAttribute("aria-busy", "true");
  $("answer-meta").textContent = "";
  $("citations").replaceChildren();
  $("verdict").replaceChildren();
  $("sources-title").hidden = true;
  let text = "";
  try {
    for await (const event of generation.streamAnswer({ question }, { timeoutMs: 120_000 })) {
      if (event.event.case === "delta") {
        text += event.event.value;
        answer.textContent = text;
      } else if (event.event.case === "details") {
        const details = event.event.value;
        renderAnswer(text, details);
        const degraded = details.degraded ? ` · simplified answer: ${details.degradedReason}` : "";
        $("answer-meta").textContent = `Answered by ${details.provider || "the copilot"}${degraded}`;
      }
    }
  } finally {
    answer.setAttribute("aria-busy", "false");
  }
}

// -- upload

async function upload(files: FileList): Promise<string> {
  const documents = [];
  for (const file of Array.from(files)) {
    if (file.size > MAX_FILE_BYTES) throw new Error(`${file.name} is larger than 2 MB`);
    documents.push({
      documentId: file.name.replace(/[^A-Za-z0-9._-]+/g, "-"),
      title: file.name.replace(/\.(md|txt)$/i, ""),
      text: await file.text(),
      source: file.name,
      contentType: file.name.toLowerCase().endsWith(".md") ? "text/markdown" : "text/plain",
    });
  }
  const response = await retrieval.ingestDocuments({ documents }, { timeoutMs: 120_000 });
  const words: Record<number, string> = {
    [IngestStatus.CREATED]: "added", [IngestStatus.REPLACED]: "updated",
    [IngestStatus.UNCHANGED]: "unchanged", [IngestStatus.EMPTY]: "empty (nothing to index)",
  };
  return response.results.map((r) => `${r.documentId}: ${words[r.status] ?? "done"} (${r.chunks} passages)`).join("; ");
}

// -- usage and quota

function row(label: string, value: string): HTMLTableRowElement {
  const tr = document.createElement("tr");
  const th = document.createElement("th");
  th.scope = "row";
  th.textContent = label;
  const td = document.createElement("td");
  td.textContent = value;
  tr.append(th, td);
  return tr;
}

const fmt = (n: bigint | number): string => Number(n).toLocaleString("en");

async function refreshUsage(): Promise<void> {
  const [usage, tenant, quota] = await Promise.all([
    metering.getUsage({}), tenants.getTenant({}), metering.checkQuota({}),
  ]);
  const t = tenant.tenant;
  const rows = [
    row("Tenant", `${t?.displayName || t?.tenantId} · ${Plan[t?.plan ?? 0]?.toLowerCase() ?? "?"} plan` +
      (t?.state === TenantState.SUSPENDED ? " · suspended" : "")),
    row("Requests this month", fmt(usage.requests)),
    row("Tokens this month", `${fmt(usage.totalTokens)} (${fmt(usage.inputTokens)} in, ${fmt(usage.outputTokens)} out)`),
  ];
  for (const q of quota.quotas) {
    const name = q.name.replace(/_/g, " ");
    rows.push(row(`Quota: ${name}`, `${fmt(q.used)} of ${fmt(q.limit)} used`));
  }
  if (t?.limits) {
    const l = t.limits;
    rows.push(row("Rate limits", `${l.requestsPerSecond}/s, ${fmt(l.requestsPerMinute)}/min, ${fmt(l.requestsPerHour)}/h`));
  }
  $("usage").querySelector("tbody")?.replaceChildren(...rows);
}

// -- wiring

function main(): void {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    signIn($<HTMLTextAreaElement>("token").value.trim());
  });
  $("dev-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const button = (e.currentTarget as HTMLFormElement).querySelector("button") as HTMLButtonElement;
    void busy(button, async () => {
      signIn(await devToken($<HTMLSelectElement>("dev-tenant").value, $<HTMLInputElement>("dev-admin").checked));
    });
  });
  $("sign-out").addEventListener("click", signOut);
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const question = $<HTMLTextAreaElement>("question").value.trim();
    if (question) void busy($<HTMLButtonElement>("ask-button"), async () => { await ask(question); await refreshUsage(); });
  });
  $("upload-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const files = $<HTMLInputElement>("files").files;
    const button = (e.currentTarget as HTMLFormElement).querySelector("button") as HTMLButtonElement;
    if (files && files.length) {
      void busy(button, async () => {
        $("upload-result").textContent = `Uploaded. ${await upload(files)}`;
        await refreshUsage();
      });
    }
  });
  $("usage-refresh").addEventListener("click", (e) => void busy(e.currentTarget as HTMLButtonElement, refreshUsage));
  render();
  void setUpDevSignIn();
  if (token) refreshUsage().catch(showError);
}

main();
