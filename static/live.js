// The live part of a server-rendered page (the dashboard and the queue page): poll its
// fragment with the ETag, swap it in without a reload (keeping scroll, open panels and
// keyboard focus on a runner's screenshot button), count ages up locally from
// data-since, and say when the server stops answering. No framework: the page is rendered by
// the server; this only keeps it current.
"use strict";

// Start keeping #live current from `fragment` (a URL; relative on the queue page, which
// nginx serves under /queue/). `who` names the server in notices, `busy` says what its 503
// means. Returns `clock`, which formats a time as the notices do.
window.startLivePage = ({ fragment, who, busy }) => {
  const POLL_MS = 1000; // while the tab is visible
  const HIDDEN_POLL_MS = 10000; // while it is hidden: nobody is looking
  const TIMEOUT_MS = 3000;

  const live = document.getElementById("live");
  const notice = document.getElementById("notice");

  let etag = live.dataset.etag || null;
  let lastAnswer = new Date();
  let skewMs = 0; // the server's clock minus ours, from the Date header
  let timer = null;

  const clock = (date) => date.toTimeString().slice(0, 8);

  function formatAge(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    if (seconds < 120) return `${seconds}s`;
    if (seconds < 7200) return `${Math.floor(seconds / 60)}m${String(seconds % 60).padStart(2, "0")}s`;
    return `${Math.floor(seconds / 3600)}h${String(Math.floor((seconds % 3600) / 60)).padStart(2, "0")}m`;
  }

  function updateAges() {
    const now = (Date.now() + skewMs) / 1000;
    for (const element of live.querySelectorAll("[data-since]")) {
      element.textContent = formatAge(now - Number(element.dataset.since));
    }
  }

  function showNotice(kind, text) {
    notice.className = `notice ${kind}`;
    notice.textContent = text;
    notice.hidden = false;
  }

  function clearNotice() {
    notice.hidden = true;
    notice.className = "notice";
    notice.textContent = "";
  }

  // Replace the live part, keeping what the reader had: scroll position (the window's and
  // each wide table's), open <details>, and focus on a runner's screenshot button.
  function swapIn(html) {
    const open = new Set([...live.querySelectorAll("details[id][open]")].map((d) => d.id));
    const scrolls = [...live.querySelectorAll(".table-wrap")].map((w) => w.scrollLeft);
    const focused = document.activeElement;
    const focusKey = focused && live.contains(focused) && focused.matches("button.shot")
      ? focused.dataset.runnerId : null;
    const { scrollX, scrollY } = window;

    live.innerHTML = html;

    for (const id of open) document.getElementById(id)?.setAttribute("open", "");
    live.querySelectorAll(".table-wrap").forEach((w, i) => { w.scrollLeft = scrolls[i] || 0; });
    if (focusKey !== null) {
      live.querySelector(`button.shot[data-runner-id="${CSS.escape(focusKey)}"]`)?.focus();
    }
    window.scrollTo(scrollX, scrollY);
    updateAges();
  }

  function answered(response) {
    const date = Date.parse(response.headers.get("Date") || "");
    if (!Number.isNaN(date) && Math.abs(date - Date.now()) > 2000) skewMs = date - Date.now();
    lastAnswer = new Date();
    document.body.dataset.updated = String(Date.now());
    clearNotice();
  }

  async function poll() {
    const controller = new AbortController();
    const timeout = setTimeout(() => controller.abort(), TIMEOUT_MS);
    const shown = () => `showing what it said at ${clock(lastAnswer)}.`;
    try {
      const headers = etag ? { "If-None-Match": etag } : {};
      const response = await fetch(fragment, { headers, cache: "no-store", signal: controller.signal });
      if (response.status === 304) {
        answered(response);
      } else if (response.ok) {
        const html = await response.text();
        etag = response.headers.get("ETag");
        swapIn(html);
        answered(response);
      } else if (response.status === 503) {
        showNotice("stale", `The ${who} ${busy} (HTTP 503); ${shown()}`);
      } else {
        showNotice("error", `[${clock(new Date())}] HTTP ${response.status} from the ${who}; ${shown()}`);
      }
    } catch (error) {
      const why = error.name === "AbortError" ? "no answer in 3 s" : error.message;
      showNotice("stale", `The ${who} is not answering (${why}); ${shown()}`);
    } finally {
      clearTimeout(timeout);
      schedule();
    }
  }

  function schedule(delay) {
    clearTimeout(timer);
    timer = setTimeout(poll, delay ?? (document.hidden ? HIDDEN_POLL_MS : POLL_MS));
  }

  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) schedule(0); // catch up at once when the reader comes back
  });

  updateAges();
  setInterval(updateAges, 1000);
  schedule();
  return { clock };
};
